"""
Tests for `swapproxy.slotfiles`: what a saved slot holds, whether it is intact, and which files
go when space runs short. Real files in a temporary directory, no reactor.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from swapproxy.slotfiles import (
    Room,
    ServerIdentity,
    SlotDirectory,
    SlotFile,
    data_name,
    identity_argv,
    over_budget,
    read_tokens,
    superseded,
    tokens_digest,
)
from tests.support.doubles import write_slot_file

SERVER = ServerIdentity("b1-test", "/models/m.gguf", 1000, 5, ("llama-server", "-m", "/models/m.gguf"))


class DirectoryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.directory = SlotDirectory(self.path)
        self.directory.ensure()

    def saved(self, name: str, tokens: list[int], saved_at: float = 1000.0, payload: int = 64,
              model: str = "m") -> SlotFile:
        size = write_slot_file(os.path.join(self.path, name), tokens, payload)
        committed = self.directory.commit(name, model, SERVER, saved_at, size)
        assert committed is not None
        return committed[0]


class ReadTokensTests(DirectoryTestCase):
    def test_tokens_of_a_saved_slot(self) -> None:
        write_slot_file(os.path.join(self.path, "a.slot"), [5, 6, 7])
        self.assertEqual(read_tokens(os.path.join(self.path, "a.slot")), [5, 6, 7])

    def test_file_names_llama_server_accepts(self) -> None:
        """
        No path separators, no characters llama-server refuses, never two dots in a row.
        """
        name = data_name("org/qwen:7b..q4", 1, 1700000000.5, "abc")
        self.assertEqual(name, "org_qwen_7b_q4-1700000000500-s1-abc.slot")
        self.assertNotIn("..", data_name("..", 0, 0, "x"))

    def test_port_and_save_path_are_not_part_of_the_identity(self) -> None:
        self.assertEqual(
            identity_argv(["llama-server", "--port", "5800", "-c", "512", "--slot-save-path", "/x", "--port=1"]),
            ("llama-server", "-c", "512"),
        )


class CommitTests(DirectoryTestCase):
    def test_a_whole_file_is_recorded_beside_it(self) -> None:
        entry = self.saved("m-1-s0-a.slot", [1, 2, 3], saved_at=1234.5)
        self.assertEqual((entry.model, entry.tokens, entry.saved_at), ("m", 3, 1234.5))
        self.assertEqual(entry.tokens_sha256, tokens_digest([1, 2, 3]))
        with open(os.path.join(self.path, "m-1-s0-a.slot.json"), encoding="utf-8") as f:
            self.assertEqual(SlotFile.from_json(json.load(f)), entry)
        self.assertEqual(self.directory.scan(), [entry])

    def test_a_file_shorter_than_llama_server_wrote_is_removed(self) -> None:
        size = write_slot_file(os.path.join(self.path, "cut.slot"), [1, 2, 3])
        with open(os.path.join(self.path, "cut.slot"), "r+b") as f:
            f.truncate(size - 10)
        self.assertIsNone(self.directory.commit("cut.slot", "m", SERVER, 1.0, size))
        self.assertEqual(os.listdir(self.path), [])

    def test_not_a_slot_file(self) -> None:
        with open(os.path.join(self.path, "junk.slot"), "wb") as f:
            f.write(b"\0" * 100)
        self.assertIsNone(self.directory.commit("junk.slot", "m", SERVER, 1.0, None))
        self.assertEqual(os.listdir(self.path), [])


class IntegrityTests(DirectoryTestCase):
    def test_intact(self) -> None:
        self.assertIsNone(self.directory.problem(self.saved("a.slot", [1, 2])))

    def test_a_changed_byte_is_found(self) -> None:
        entry = self.saved("a.slot", [1, 2])
        with open(os.path.join(self.path, "a.slot"), "r+b") as f:
            f.seek(entry.size - 5)
            f.write(b"\xff")
        self.assertIn("CRC-32", self.directory.problem(entry) or "")

    def test_a_truncated_file_is_found(self) -> None:
        entry = self.saved("a.slot", [1, 2])
        with open(os.path.join(self.path, "a.slot"), "r+b") as f:
            f.truncate(entry.size // 2)
        self.assertIn(f"{entry.size} were saved", self.directory.problem(entry) or "")


class ScanTests(DirectoryTestCase):
    def test_left_overs_are_removed(self) -> None:
        """
        A data file without a record (a save cut short) goes, unless it is being written; a record
        whose file is gone goes; an unreadable record goes with its file.
        """
        kept = self.saved("kept.slot", [1], saved_at=2.0)
        older = self.saved("older.slot", [2], saved_at=1.0)
        write_slot_file(os.path.join(self.path, "orphan.slot"), [3])
        write_slot_file(os.path.join(self.path, "writing.slot"), [4])
        gone = self.saved("gone.slot", [5])
        os.unlink(os.path.join(self.path, "gone.slot"))
        write_slot_file(os.path.join(self.path, "bad.slot"), [6])
        with open(os.path.join(self.path, "bad.slot.json"), "w", encoding="utf-8") as f:
            f.write("{not json")
        with open(os.path.join(self.path, "notes.txt"), "w", encoding="utf-8") as f:
            f.write("the user's own file")

        entries = self.directory.scan(busy={"writing.slot"})

        self.assertEqual(entries, [older, kept])
        self.assertNotIn(gone, entries)
        self.assertEqual(
            sorted(os.listdir(self.path)),
            ["kept.slot", "kept.slot.json", "notes.txt", "older.slot", "older.slot.json", "writing.slot"],
        )

    def test_a_missing_directory_holds_nothing(self) -> None:
        self.assertEqual(SlotDirectory(os.path.join(self.path, "nope")).scan(), [])


class PolicyTests(DirectoryTestCase):
    def test_a_continued_conversation_supersedes_its_beginning(self) -> None:
        first = self.saved("first.slot", [1, 2, 3], saved_at=1.0)
        other = self.saved("other.slot", [1, 2, 9], saved_at=2.0)
        other_model = self.saved("x.slot", [1, 2], saved_at=2.0, model="x")
        longer = self.saved("longer.slot", [1, 2, 3, 4, 5], saved_at=3.0)
        self.assertEqual(superseded(longer, [1, 2, 3, 4, 5], [first, other, other_model, longer]), [first])

    def test_the_oldest_go_first_past_the_size_budget(self) -> None:
        entries = [self.saved(f"{n}.slot", [n], saved_at=n, payload=100) for n in range(4)]
        size = entries[0].size
        room = Room(free=10**12, used=4 * size)
        self.assertEqual(over_budget(entries, room, 2 * size, 0), entries[:2])
        self.assertEqual(over_budget(entries, room, 0, 0), [], "0 is no limit")

    def test_the_oldest_go_first_to_keep_the_disk_free(self) -> None:
        entries = [self.saved(f"{n}.slot", [n], saved_at=n, payload=100) for n in range(3)]
        size = entries[0].size
        room = Room(free=size, used=3 * size)
        self.assertEqual(over_budget(entries, room, 0, 2 * size), entries[:1])
        self.assertEqual(over_budget(entries, room, 0, 10 * size), entries, "everything, if need be")

# -*- test-case-name: tests.test_listing -*-
"""
The records of ``/v1/models`` beyond a local model's own: capabilities, aliases
(``includeAliasesInList``), peer models, selectors and the active profile's pins, shaped as
llama-swap head shapes them (reference section 5.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swapproxy.config import Capabilities, Config
from swapproxy.peers import PeerHealth
from swapproxy.upstream import State

#: Top-level record fields that ``capabilities`` renders; metadata keys with these names are
#: dropped from ``meta.llamaswap`` when a model declares capabilities.
CAPABILITY_FIELDS = ("architecture", "capabilities", "supported_parameters", "context_length")


def capability_fields(caps: Capabilities) -> dict[str, Any]:
    """
    A model's ``capabilities`` as OpenRouter-style ``/v1/models`` fields (none when empty):
    ``architecture`` (modalities), ``capabilities`` (booleans), ``supported_parameters`` and
    ``context_length``.
    """
    fields: dict[str, Any] = {}
    if caps.empty:
        return fields
    inputs, outputs = caps.inputs, caps.outputs
    architecture: dict[str, Any] = {}
    if inputs:
        architecture["input_modalities"] = list(inputs)
    if outputs:
        architecture["output_modalities"] = list(outputs)
    if inputs and outputs:
        architecture["modality"] = "+".join(inputs) + "->" + "+".join(outputs)
    if architecture:
        fields["architecture"] = architecture
    flags: dict[str, bool] = {}
    if "image" in inputs:
        flags["vision"] = True
    if inputs and outputs:
        for key, (given, made) in {
            "audio_transcriptions": ("audio", "text"),
            "audio_speech": ("text", "audio"),
            "image_generation": ("text", "image"),
            "image_to_image": ("image", "image"),
        }.items():
            if given in inputs and made in outputs:
                flags[key] = True
    if caps.tools:
        flags["function_calling"] = True
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if caps.reranker:
        flags["reranker"] = True
    if flags:
        fields["capabilities"] = flags
    if caps.context:
        fields["context_length"] = caps.context
    return fields


def with_capabilities(record: dict[str, Any], caps: Capabilities) -> dict[str, Any]:
    """
    ``record`` with the capability fields added, and ``meta.n_ctx`` when a context is declared.
    """
    if caps.empty:
        return record
    meta = record.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("llamaswap"), Mapping):
        kept = {k: v for k, v in meta["llamaswap"].items() if k not in CAPABILITY_FIELDS}
        if kept:
            meta["llamaswap"] = kept
        else:
            del meta["llamaswap"]
    record.update(capability_fields(caps))
    if caps.context:
        record.setdefault("meta", {})["n_ctx"] = caps.context
    if record.get("meta") == {}:
        del record["meta"]
    return record


def _base(record_id: str, created: int, state: str, **fields: Any) -> dict[str, Any]:
    record = {"id": record_id, "object": "model", "created": created, "owned_by": "swapproxy", "state": state}
    record.update({k: v for k, v in fields.items() if v not in ("", None, {})})
    return record


def alias_records(config: Config, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    With ``includeAliasesInList``: a record for each alias of each listed local model, a copy
    of the model's with ``id`` the alias and ``meta.llamaswap`` marking it.
    """
    if not config.include_aliases_in_list:
        return []
    records = []
    for record in listed:
        model = config.models.get(record["id"])
        if model is None:
            continue
        # Its aliases, and (as in llama-swap) the setParamsByID names that act as aliases.
        for alias in [name for name, target in config.aliases.items() if target == model.id]:
            copy = {k: v for k, v in record.items() if k != "aliases"}
            copy["id"] = alias
            meta = dict(copy.get("meta") or {})
            meta["llamaswap"] = {**dict(meta.get("llamaswap") or {}), "type": "alias", "modelID": model.id}
            copy["meta"] = meta
            records.append(copy)
    return records


def peer_records(config: Config, health: Mapping[str, PeerHealth], created: int) -> list[dict[str, Any]]:
    """
    A record for each model of each peer, ``id`` ``peer/model``, with its live ``state``, the
    ``status`` the peer gave it (with a swapproxy peer's load ``progress``) and the peer's
    reachability.
    """
    records = []
    for peer in config.peers.values():
        known = health.get(peer.id) or PeerHealth()
        peer_info: dict[str, Any] = {"id": peer.id, "reachable": known.reachable}
        if known.error:
            peer_info["error"] = known.error
        for model in peer.models:
            fqn = f"{peer.id}/{model}"
            records.append(_base(
                fqn, created, known.model_state(model),
                status=known.model_status(model),
                name=f"{peer.id}: {model}",
                meta={"llamaswap": {"type": "peer", "peerID": peer.id, "modelID": model}},
                peer=peer_info,
            ))
    return records


def selector_records(config: Config, states: Mapping[str, State], created: int) -> list[dict[str, Any]]:
    """
    A record for each listed selector; its ``state`` is that of the target it would choose
    first (for ``pin``, always the first target).
    """
    records = []
    for selector in config.selectors.values():
        if selector.unlisted:
            continue
        state = "stopped"
        for target in selector.targets:
            model = config.resolve(target)
            target_state = states.get(model.id) if model is not None else None
            if target_state in (State.READY, State.STARTING):
                state = target_state.value
                break
            if selector.strategy == "pin":
                state = target_state.value if target_state is not None else "peer"
                break
        info: dict[str, Any] = {"type": "selector", "strategy": selector.strategy, "targets": list(selector.targets)}
        if selector.strategy == "spillover":
            info["spillover"] = selector.spillover
        records.append(_base(
            selector.id, created, state, name=selector.name, description=selector.description,
            meta={"llamaswap": {**dict(selector.metadata), **info}},
        ))
    return records


def profile_records(config: Config, pins: Mapping[str, str], taken: set[str], created: int) -> list[dict[str, Any]]:
    """
    A record for each pin of the active profile whose name is not already listed (and that
    is not turned off).
    """
    return [
        _base(pin, created, "pinned", meta={"llamaswap": {"type": "profile", "target": target}})
        for pin, target in pins.items()
        if target and pin not in taken
    ]

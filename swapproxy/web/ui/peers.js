// The peer models: one table row per model of each peer swapproxy relays to, as the peer reports
// it. Read-only: a peer loads and unloads its own models.

import { duration, h, syncRows } from "./format.js";

const LOADING = new Set(["starting", "loading"]);

/** Seconds since `row` was received, for the times that move with the clock. */
function since(row) {
  return (performance.now() - row.received) / 1000;
}

export class PeersView {
  /**
   * @param section shown when there is any peer model
   * @param tbody the table body to fill
   */
  constructor({ section, tbody }) {
    this.section = section;
    this.tbody = tbody;
    this.rows = new Map();
    setInterval(() => this.tick(), 1000);
  }

  /** Every peer model's entry, sorted by id (a `peers` message). */
  setAll(entries) {
    syncRows(this.rows, entries, this.tbody, (entry) => {
      let row = this.rows.get(entry.id);
      if (!row) {
        row = this.createRow(entry.id);
        this.rows.set(entry.id, row);
      }
      row.entry = entry;
      row.received = performance.now();
      this.draw(row);
    });
    this.section.hidden = entries.length === 0;
  }

  createRow(id) {
    const state = h("span", { class: "state" });
    const details = h("td", { class: "details-cell", dataset: { label: "Details" } });
    const peer = h("td", { dataset: { label: "Peer" } });
    const tr = h(
      "tr",
      { dataset: { model: id } },
      h("th", { scope: "row" }, h("span", { class: "model-id", text: id })),
      h("td", { dataset: { label: "State" } }, state),
      details,
      peer,
    );
    const progress = h("progress", { max: "100" });
    return { id, tr, state, details, peer, progress, live: null };
  }

  draw(row) {
    const entry = row.entry;
    row.state.textContent = entry.status;
    row.state.dataset.status = entry.status;
    row.tr.dataset.status = entry.status;
    row.peer.textContent = entry.reachable === false ? `${entry.peer}: unreachable` : entry.peer;
    row.live = null;
    const parts = [];
    if (entry.progress && LOADING.has(entry.status)) {
      parts.push(...this.loadDetails(row));
    } else if (entry.reachable === false) {
      parts.push(h("div", { class: "line", text: entry.error || "the peer cannot be reached" }));
    } else if (entry.reachable === null) {
      parts.push(h("div", { class: "line", text: "not heard from the peer yet" }));
    }
    row.details.replaceChildren(h("div", { class: "details" }, parts));
  }

  loadDetails(row) {
    const progress = row.entry.progress;
    const bar = row.progress;
    const percent = h("span", { class: "percent" });
    if (progress.percent === null) {
      bar.removeAttribute("value");
    } else {
      bar.value = progress.percent;
      percent.textContent = `${progress.percent}%`;
    }
    bar.setAttribute("aria-label", `Loading ${row.entry.id}`);
    const text = () => {
      const words = [progress.label || "loading", `${duration(progress.elapsed + since(row))} elapsed`];
      if (progress.eta !== null) {
        const left = progress.eta - since(row);
        words.push(left > 0 ? `about ${duration(left)} left` : "ready any moment");
      }
      return words.join(" · ");
    };
    const times = h("div", { class: "line", text: text() });
    row.live = () => {
      times.textContent = text();
    };
    return [h("div", { class: "load" }, bar, percent), times];
  }

  tick() {
    if (document.hidden) return;
    for (const row of this.rows.values()) if (row.live) row.live();
  }
}

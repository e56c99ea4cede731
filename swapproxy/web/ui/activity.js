// The activity view: the model requests swapproxy answered, newest first, at most MAX_ROWS.

import { clockTime, count, h, millis, plural, rate } from "./format.js";

export const MAX_ROWS = 500;

export class ActivityView {
  /**
   * @param tbody the table body to fill
   * @param empty shown while there is no request
   * @param summary counts what is shown
   * @param older a button that fetches older requests from the history
   * @param fetchOlder fetchOlder(beforeTime) resolves to rows, newest first
   */
  constructor({ tbody, empty, summary, older, fetchOlder }) {
    this.tbody = tbody;
    this.empty = empty;
    this.summary = summary;
    this.older = older;
    this.fetchOlder = fetchOlder;
    this.rows = [];
    this.primed = false;
    older.addEventListener("click", () => this.showOlder());
    this.reset();
  }

  /** A new connection: the recent history comes first. */
  reset() {
    this.rows = [];
    this.primed = false;
    this.exhausted = false;
    this.tbody.replaceChildren();
    this.refresh();
  }

  /** An `activity` message: the recent history (the first), then each new request. */
  add(rows) {
    const live = this.primed;
    this.primed = true;
    for (const row of rows) {
      this.rows.unshift(row);
      this.tbody.prepend(this.rowElement(row, live));
    }
    while (this.rows.length > MAX_ROWS) {
      this.rows.pop();
      this.tbody.lastElementChild.remove();
    }
    this.refresh();
  }

  async showOlder() {
    const oldest = this.rows.at(-1);
    const room = MAX_ROWS - this.rows.length;
    if (room <= 0) return;
    this.older.disabled = true;
    try {
      const rows = await this.fetchOlder(oldest ? oldest.time : null, Math.min(room, 100));
      for (const row of rows) {
        this.rows.push(row);
        this.tbody.append(this.rowElement(row, false));
      }
      this.exhausted = rows.length === 0;
    } finally {
      this.refresh();
    }
  }

  rowElement(row, live) {
    const ok = row.status >= 200 && row.status < 400;
    const cell = (label, text, className) => h("td", { class: className, dataset: { label } }, text);
    return h(
      "tr",
      { class: live ? "new" : null },
      cell("Time", clockTime(row.time)),
      cell("Model", row.model || "—", "model"),
      cell("Path", row.path, "path"),
      cell("Status", h("span", { class: ok ? "status-ok" : "status-bad", text: row.status }), "num"),
      cell("Duration", millis(row.duration_ms), "num"),
      cell("TTFT", millis(row.ttfb_ms), "num"),
      cell("Prompt tokens", count(row.prompt_tokens), "num"),
      cell("Generated tokens", count(row.generated_tokens), "num"),
      cell("Tokens/s", rate(row.tokens_per_second), "num"),
    );
  }

  refresh() {
    this.empty.hidden = this.rows.length > 0;
    this.summary.textContent = this.rows.length ? `the last ${plural(this.rows.length, "request")}` : "";
    this.older.disabled = this.rows.length === 0 || this.rows.length >= MAX_ROWS || this.exhausted;
  }
}

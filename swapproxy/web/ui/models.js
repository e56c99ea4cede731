// The models view: one table row per configured model, redrawn from the entries the server sends.

import { clockTime, duration, h, plural, syncRows } from "./format.js";

const LOADING = new Set(["starting", "loading"]);

/** Seconds since `row` was received, for the values that move with the clock. */
function since(row) {
  return (performance.now() - row.received) / 1000;
}

export class ModelsView {
  /**
   * @param tbody the table body to fill
   * @param empty shown when no model is configured
   * @param summary the line that counts models by state
   * @param act act(action, modelId) performs a button's action
   */
  constructor({ tbody, empty, summary, act }) {
    this.tbody = tbody;
    this.empty = empty;
    this.summary = summary;
    this.act = act;
    this.rows = new Map();
    // Uptime, TTL and load times count on between two entries.
    setInterval(() => this.tick(), 1000);
  }

  /** Every model's entry, sorted by id (a `modelStatus` message). */
  setAll(entries) {
    syncRows(this.rows, entries, this.tbody, (entry) => this.update(entry, false));
    this.empty.hidden = entries.length > 0;
    this.summarize();
  }

  /** One model's entry changed (a `model` message). */
  update(entry, summarize = true) {
    let row = this.rows.get(entry.id);
    if (!row) {
      row = this.createRow(entry.id);
      this.rows.set(entry.id, row);
      this.tbody.append(row.tr);
    }
    row.entry = entry;
    row.received = performance.now();
    this.draw(row);
    if (summarize) this.summarize();
  }

  createRow(id) {
    const name = h("th", { scope: "row" });
    const state = h("span", { class: "state" });
    const details = h("td", { class: "details-cell", dataset: { label: "Details" } });
    const requests = h("td", { dataset: { label: "Requests" } });
    const lastLoad = h("td", { dataset: { label: "Last load" } });
    const load = h("button", { type: "button", class: "primary", text: "Load" });
    const unload = h("button", { type: "button", text: "Unload" });
    load.addEventListener("click", () => this.act("load", id));
    unload.addEventListener("click", () => this.act("unload", id));
    const tr = h(
      "tr",
      { dataset: { model: id } },
      name,
      h("td", { dataset: { label: "State" } }, state),
      details,
      requests,
      lastLoad,
      h("td", {}, h("div", { class: "actions" }, load, unload)),
    );
    // The progress bar is kept from entry to entry, so that it moves rather than blinks.
    const progress = h("progress", { max: "100" });
    return { id, tr, name, state, details, requests, lastLoad, load, unload, progress, live: [], failureOpen: null };
  }

  draw(row) {
    const entry = row.entry;
    const status = entry.status;
    row.name.replaceChildren(...this.describe(entry));
    row.state.textContent = status;
    row.state.dataset.status = status;
    row.tr.dataset.status = status;
    const waiting = entry.queued ? `${entry.queued} waiting` : "";
    const busy = entry.in_flight ? `${entry.in_flight} in flight` : "";
    row.requests.textContent = [busy, waiting].filter(Boolean).join(" · ") || "idle";
    row.lastLoad.textContent = entry.last_load === null ? "—" : duration(entry.last_load);
    row.load.disabled = status !== "stopped" && status !== "failed";
    row.unload.disabled = status === "stopped" || (status === "failed" && !entry.queued);
    row.load.setAttribute("aria-label", `Load ${entry.id}`);
    row.unload.setAttribute("aria-label", `Unload ${entry.id}`);
    this.drawDetails(row);
  }

  describe(entry) {
    const parts = [h("span", { class: "model-id", text: entry.id })];
    if (entry.name && entry.name !== entry.id) parts.push(h("span", { class: "model-name", text: entry.name }));
    if (entry.description) parts.push(h("span", { class: "model-description", text: entry.description }));
    const tags = [];
    for (const alias of entry.aliases || []) tags.push(h("span", { class: "tag", title: "alias", text: alias }));
    if (entry.group && entry.group !== "(default)") {
      tags.push(h("span", { class: "tag", title: "group", text: `group ${entry.group}` }));
    }
    if (entry.unlisted) tags.push(h("span", { class: "tag", text: "unlisted" }));
    if (tags.length) parts.push(h("div", { class: "tags" }, tags));
    return parts;
  }

  drawDetails(row) {
    const entry = row.entry;
    const parts = [];
    row.live = [];
    if (LOADING.has(entry.status)) {
      parts.push(...this.loadDetails(row));
    } else if (entry.status === "ready") {
      parts.push(this.liveLine(row, () => `up ${duration(entry.uptime + since(row))}`));
      if (entry.ttl > 0 && entry.ttl_remaining !== null) {
        parts.push(this.liveLine(row, () => `unloads in ${duration(entry.ttl_remaining - since(row))} if idle (ttl ${duration(entry.ttl)})`));
      } else if (entry.ttl > 0) {
        parts.push(h("div", { class: "line", text: `unloads ${duration(entry.ttl)} after its last request` }));
      } else {
        parts.push(h("div", { class: "line", text: "stays loaded (no ttl)" }));
      }
    } else if (entry.status === "queued") {
      // Waiting requests, or a load that no request waits for (Load, /api/models/load).
      const waiting = entry.queued ? `: ${plural(entry.queued, "request")}` : "";
      parts.push(h("div", { class: "line", text: `waiting for its turn to load${waiting}` }));
    } else if (entry.status === "stopping") {
      parts.push(h("div", { class: "line", text: "stopping…" }));
    } else if (entry.status === "unhealthy") {
      parts.push(h("div", { class: "line", text: "not responding: stopping it…" }));
    } else if (entry.status === "stopped") {
      parts.push(h("div", { class: "line", text: "not loaded" }));
    }
    const failure = entry.last_failure;
    if (failure) parts.push(this.failureDetails(failure, entry.status === "failed" || entry.status === "unhealthy", row));
    row.details.replaceChildren(h("div", { class: "details" }, parts));
  }

  loadDetails(row) {
    const progress = row.entry.progress || { stage: "starting", label: "", percent: null, elapsed: 0, eta: null };
    const bar = row.progress;
    const percent = h("span", { class: "percent" });
    if (progress.percent === null) {
      bar.removeAttribute("value");
      percent.textContent = "";
    } else {
      bar.value = progress.percent;
      percent.textContent = `${progress.percent}%`;
    }
    bar.setAttribute("aria-label", `Loading ${row.entry.id}`);
    const label = progress.label || (progress.stage === "starting" ? "starting the process" : "loading");
    const times = this.liveLine(row, () => {
      const elapsed = progress.elapsed + since(row);
      const words = [label, `${duration(elapsed)} elapsed`];
      if (progress.eta !== null) {
        const left = progress.eta - since(row);
        words.push(left > 0 ? `about ${duration(left)} left` : "ready any moment");
      }
      return words.join(" · ");
    });
    return [h("div", { class: "load" }, bar, percent), times];
  }

  failureDetails(failure, current, row) {
    const lines = failure.last_lines || [];
    const title = current ? "Failed: " : `Last failure at ${clockTime(failure.time)}: `;
    const summary = h("summary", {}, title, failure.reason);
    const details = h("details", { class: current ? "failure" : "failure old-failure" }, summary);
    // Open while it is why the model is down; after that as the reader last left it.
    const key = `${failure.time}`;
    details.open = row.failureOpen && row.failureOpen.key === key ? row.failureOpen.open : current;
    details.addEventListener("toggle", () => {
      row.failureOpen = { key, open: details.open };
    });
    if (lines.length) details.append(h("pre", { text: lines.join("\n") }));
    if (failure.exit_code !== null && failure.exit_code !== undefined) {
      summary.append(` (exit code ${failure.exit_code})`);
    }
    return details;
  }

  liveLine(row, text) {
    const line = h("div", { class: "line", text: text() });
    row.live.push(() => {
      line.textContent = text();
    });
    return line;
  }

  tick() {
    if (document.hidden) return;
    for (const row of this.rows.values()) for (const update of row.live) update();
  }

  summarize() {
    const counts = new Map();
    let inFlight = 0;
    let queued = 0;
    for (const { entry } of this.rows.values()) {
      counts.set(entry.status, (counts.get(entry.status) || 0) + 1);
      inFlight += entry.in_flight;
      queued += entry.queued;
    }
    const words = [plural(this.rows.size, "model")];
    for (const status of ["ready", "loading", "starting", "queued", "stopping", "unhealthy", "failed"]) {
      if (counts.get(status)) words.push(`${counts.get(status)} ${status}`);
    }
    if (inFlight) words.push(`${plural(inFlight, "request")} in flight`);
    if (queued) words.push(`${plural(queued, "request")} waiting`);
    this.summary.textContent = words.join(" · ");
  }
}

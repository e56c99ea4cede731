// The logs view: swapproxy's own log and each model's, live. Each log keeps its newest MAX_LINES
// lines, the page shows at most MAX_LINES, and the page is redrawn at most once a frame however
// fast a model prints.

import { h } from "./format.js";

export const MAX_LINES = 1500;
const MAX_PARTIAL = 8192;
// Terminal colour codes that some servers print.
const ESCAPES = /\x1b\[[0-9;?]*[A-Za-z]/g;
const PROXY = "proxy";
const ALL_MODELS = "models";

export class LogsView {
  /**
   * @param container the element the lines are shown in
   * @param select chooses which log is shown
   * @param follow a checkbox: keep the newest line in sight
   * @param clear a button that empties the log shown
   */
  constructor({ container, select, follow, clear }) {
    this.container = container;
    this.select = select;
    this.follow = follow;
    this.logs = new Map();
    this.view = PROXY;
    this.seq = 0;
    this.shownUpTo = 0;
    this.frameRequested = false;
    this.modelsShown = null;
    select.addEventListener("change", () => {
      this.view = select.value;
      this.redraw();
    });
    clear.addEventListener("click", () => {
      this.log(this.view).lines = [];
      this.redraw();
    });
    container.addEventListener("scroll", () => {
      const atBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 8;
      if (follow.checked !== atBottom) follow.checked = atBottom;
    });
    follow.addEventListener("change", () => {
      if (follow.checked) container.scrollTop = container.scrollHeight;
    });
    this.setModels([]);
  }

  log(key) {
    let log = this.logs.get(key);
    if (!log) {
      log = { lines: [], partial: "" };
      this.logs.set(key, log);
    }
    return log;
  }

  /** A new connection: its histories follow. */
  reset() {
    this.logs.clear();
    this.redraw();
  }

  /** The configured models, for the choice of log. */
  setModels(ids) {
    const key = ids.join("\n");
    if (key === this.modelsShown) return; // a redrawn list would close it under the reader's pointer
    this.modelsShown = key;
    const choices = [
      [PROXY, "swapproxy"],
      [ALL_MODELS, "All models"],
      ...ids.map((id) => [`model:${id}`, id]),
    ];
    const current = choices.some(([value]) => value === this.view) ? this.view : PROXY;
    this.select.replaceChildren(...choices.map(([value, label]) => h("option", { value, text: label })));
    this.select.value = current;
    if (current !== this.view) {
      this.view = current;
      this.redraw();
    }
  }

  /** A `logData` message: {source: "proxy" | "model", model, data}. */
  add({ source, model, data }) {
    const key = source === "model" ? `model:${model}` : PROXY;
    const log = this.log(key);
    const pieces = (log.partial + data.replace(ESCAPES, "")).split("\n");
    log.partial = pieces.pop();
    if (log.partial.length > MAX_PARTIAL) {
      pieces.push(log.partial);
      log.partial = "";
    }
    for (const text of pieces) {
      const line = { seq: ++this.seq, text, model: source === "model" ? model : null };
      this.append(log, line);
      if (line.model !== null) this.append(this.log(ALL_MODELS), line);
    }
    if (pieces.length && !this.frameRequested) {
      this.frameRequested = true;
      requestAnimationFrame(() => {
        this.frameRequested = false;
        this.drawNew();
      });
    }
  }

  append(log, line) {
    log.lines.push(line);
    if (log.lines.length > MAX_LINES * 1.25) log.lines.splice(0, log.lines.length - MAX_LINES);
  }

  lineElement(line) {
    const element = h("div", { class: "line" });
    if (this.view === ALL_MODELS) element.append(h("span", { class: "source", text: `[${line.model}]` }));
    element.append(line.text);
    if (/\[(WARN|WARNING)\]|\bwarning\b/i.test(line.text)) element.classList.add("warn");
    if (/\[(ERROR|CRITICAL)\]|\berror\b|\bfailed\b/i.test(line.text)) element.classList.add("error");
    return element;
  }

  /** Add the lines that came since the last frame to the log shown. */
  drawNew() {
    const lines = this.log(this.view).lines;
    let first = lines.length;
    while (first > 0 && lines[first - 1].seq > this.shownUpTo) first--;
    if (first === lines.length) return;
    if (lines.length - first >= MAX_LINES) {
      this.redraw();
      return;
    }
    const fragment = document.createDocumentFragment();
    for (let i = first; i < lines.length; i++) fragment.append(this.lineElement(lines[i]));
    this.container.append(fragment);
    let extra = this.container.childElementCount - MAX_LINES;
    while (extra-- > 0) this.container.firstElementChild.remove();
    this.shownUpTo = lines[lines.length - 1].seq;
    this.scroll();
  }

  /** Draw the log shown from scratch. */
  redraw() {
    const lines = this.log(this.view).lines.slice(-MAX_LINES);
    this.container.replaceChildren(...lines.map((line) => this.lineElement(line)));
    this.shownUpTo = this.seq;
    this.scroll();
  }

  scroll() {
    if (this.follow.checked) this.container.scrollTop = this.container.scrollHeight;
  }
}

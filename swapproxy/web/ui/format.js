// Small helpers: building elements and writing numbers for people.

/**
 * Make an element: h("td", {class: "num", dataset: {label: "Status"}}, "200", otherNode).
 * Text children become text nodes, so nothing from the server is ever parsed as HTML.
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/**
 * Make a table's rows match `entries` (sorted by id): the rows of ids no longer listed go, and
 * put(entry) draws each entry's row (making it if needed) into `rows`, a Map of id -> {tr, ...};
 * the rows are then in the entries' order.
 */
export function syncRows(rows, entries, tbody, put) {
  const ids = new Set(entries.map((entry) => entry.id));
  for (const [id, row] of rows) {
    if (!ids.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  for (const entry of entries) {
    put(entry);
    tbody.append(rows.get(entry.id).tr);
  }
}

/** 0.4 s, 12 s, 3 min 5 s, 2 h 4 min. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, seconds);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) {
    const m = Math.floor(s / 60), rest = Math.floor(s % 60);
    return rest ? `${m} min ${rest} s` : `${m} min`;
  }
  const hours = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  if (hours < 48) return m ? `${hours} h ${m} min` : `${hours} h`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/** Milliseconds as 850 ms or 2.4 s. */
export function millis(ms) {
  if (ms === null || ms === undefined) return "—";
  return ms < 1000 ? `${Math.round(ms)} ms` : duration(ms / 1000);
}

/** A count with thousands separators, or a dash. */
export function count(n) {
  return n === null || n === undefined ? "—" : Math.round(n).toLocaleString();
}

/** A rate such as 42.5. */
export function rate(n) {
  if (n === null || n === undefined) return "—";
  return n >= 100 ? Math.round(n).toLocaleString() : n.toFixed(1);
}

/** Unix seconds as the local time of day (and the date, when it is not today). */
export function clockTime(unixSeconds) {
  const when = new Date(unixSeconds * 1000);
  const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  if (when.toDateString() === new Date().toDateString()) return time;
  return `${when.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

/** "1 request", "3 requests". */
export function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

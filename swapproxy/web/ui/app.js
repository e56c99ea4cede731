// swapproxy's dashboard. The server owns the state: the page opens one event stream, whose first
// messages are the snapshot (every model, the recent requests, the log histories), and draws what
// it is told from then on. Buttons post to the API and wait for the stream to show the effect.

import { ActivityView } from "./activity.js";
import { MAX_LINES, LogsView } from "./logs.js";
import { ModelsView } from "./models.js";
import { PeersView } from "./peers.js";
import { follow } from "./stream.js";

const $ = (id) => document.getElementById(id);
// Relative to the page, so that swapproxy may sit under a path prefix behind a reverse proxy.
const api = (path) => new URL(`../${path}`, window.location.href);

// -- telling the reader ----------------------------------------------------------------------------

function notice(text) {
  $("notice-text").textContent = text;
  $("notice").hidden = false;
}
$("notice-close").addEventListener("click", () => {
  $("notice").hidden = true;
});

function connection(state, text, banner = "") {
  $("connection").dataset.state = state;
  $("connection").textContent = text;
  $("lost").textContent = banner;
  $("lost").hidden = !banner;
}

// -- actions ---------------------------------------------------------------------------------------

const ACTIONS = {
  load: (id) => `api/models/load/${encodeURIComponent(id)}`,
  unload: (id) => `api/models/unload/${encodeURIComponent(id)}`,
  "unload-all": () => "api/models/unload",
};

async function act(action, id) {
  const what = id ? `${action} ${id}` : "unload every model";
  try {
    const response = await fetch(api(ACTIONS[action](id)), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error.message;
      } catch {
        // not JSON: the status says it
      }
      notice(`Could not ${what}: ${message}`);
    }
  } catch (error) {
    notice(`Could not ${what}: ${error.message}`);
  }
}

// "Unload all" asks to be pressed twice.
const unloadAll = $("unload-all");
let armed = null;
unloadAll.addEventListener("click", () => {
  if (armed === null) {
    unloadAll.textContent = "Unload all: sure?";
    armed = setTimeout(() => {
      unloadAll.textContent = "Unload all";
      armed = null;
    }, 4000);
    return;
  }
  clearTimeout(armed);
  armed = null;
  unloadAll.textContent = "Unload all";
  act("unload-all");
});

// -- views -----------------------------------------------------------------------------------------

const models = new ModelsView({
  tbody: $("model-rows"),
  empty: $("no-models"),
  summary: $("models-summary"),
  act,
});

const peers = new PeersView({ section: $("peer-models"), tbody: $("peer-rows") });

const logs = new LogsView({
  container: $("log-lines"),
  select: $("log-source"),
  follow: $("log-follow"),
  clear: $("log-clear"),
});
$("log-limit").textContent = MAX_LINES.toLocaleString();

const activity = new ActivityView({
  tbody: $("activity-rows"),
  empty: $("no-activity"),
  summary: $("activity-summary"),
  older: $("activity-older"),
  async fetchOlder(before, limit) {
    const url = api("api/activity");
    url.searchParams.set("limit", limit);
    if (before !== null) url.searchParams.set("before", before);
    const response = await fetch(url);
    if (!response.ok) {
      notice(`Could not read older requests: ${response.status} ${response.statusText}`);
      return [];
    }
    return (await response.json()).data;
  },
});

const VIEWS = ["models", "logs", "activity"];

function show() {
  const wanted = window.location.hash.slice(1);
  const current = VIEWS.includes(wanted) ? wanted : "models";
  for (const view of VIEWS) {
    $(view).hidden = view !== current;
    const link = $(`nav-${view}`);
    if (view === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (current === "logs") logs.scroll();
}
window.addEventListener("hashchange", show);
show();

// -- the stream ------------------------------------------------------------------------------------

let everConnected = false;

follow(api("api/events?logs=models&activity"), {
  onOpen() {
    everConnected = true;
    connection("live", "Live");
    logs.reset();
    activity.reset();
    peers.setAll([]); // the snapshot that follows lists them, if there are any
  },
  onLost() {
    if (everConnected) {
      connection("lost", "Reconnecting…", "The connection to swapproxy was lost: what you see may be out of date. Reconnecting…");
    } else {
      connection("lost", "Connecting…", "Cannot reach swapproxy's event stream (/api/events). Retrying…");
    }
  },
  onMessage(type, data) {
    if (type === "modelStatus") {
      models.setAll(data);
      logs.setModels(data.map((entry) => entry.id));
    } else if (type === "model") {
      models.update(data);
    } else if (type === "peers") {
      peers.setAll(data);
    } else if (type === "logData") {
      logs.add(data);
    } else if (type === "activity") {
      activity.add(data);
    }
  },
});

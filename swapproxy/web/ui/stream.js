// The one connection to swapproxy: an EventSource on /api/events, reopened when it closes.

const FIRST_RETRY_MS = 1000;
const LAST_RETRY_MS = 15000;

/**
 * Follow `url` until the page is closed.
 *
 * onOpen() runs when a connection is established (the server then sends its snapshot first),
 * onMessage(type, data) for each message, onLost() when the connection drops.
 */
export function follow(url, { onOpen, onMessage, onLost }) {
  let retry = FIRST_RETRY_MS;

  function open() {
    const source = new EventSource(url);
    source.addEventListener("open", () => {
      retry = FIRST_RETRY_MS;
      onOpen();
    });
    source.addEventListener("message", (event) => {
      let type, data;
      try {
        const envelope = JSON.parse(event.data);
        type = envelope.type;
        data = JSON.parse(envelope.data);
      } catch (error) {
        console.warn("swapproxy: ignoring a message that is not JSON", error);
        return;
      }
      onMessage(type, data);
    });
    source.addEventListener("error", () => {
      onLost();
      if (source.readyState === EventSource.CLOSED) {
        // The server answered with an error (the browser gives up on those): try again later.
        source.close();
        setTimeout(open, retry);
        retry = Math.min(retry * 2, LAST_RETRY_MS);
      }
      // Otherwise the browser is already reconnecting by itself.
    });
  }

  open();
}

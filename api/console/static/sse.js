// Server-sent events over fetch. EventSource cannot send an Authorization header, so the
// console reads GET /v1/jobs/{id}/events with fetch and a stream reader, parses the
// text/event-stream format as the HTML standard defines it, and resumes after a drop with
// Last-Event-ID, as EventSource would.

import { ApiError, apiUrl, authHeaders, errorOf } from "./api.js";

const TERMINAL = new Set(["done", "error"]);
const RETRYABLE = new Set([429, 502, 503, 504]);
const MAX_DELAY_MS = 10_000;

/** The text/event-stream parser of the HTML standard ("interpreting an event stream"). */
export class SseParser {
  constructor(onEvent, lastEventId = "") {
    this.onEvent = onEvent;
    this.lastEventId = lastEventId;
    this.retry = null;
    this.buffer = "";
    this.started = false;
    this.resetEvent();
  }

  resetEvent() {
    this.data = [];
    this.type = "";
    this.idBuffer = this.lastEventId;
  }

  /** Feed decoded text; complete lines are interpreted, a partial one waits for more. */
  push(text) {
    if (!this.started) {
      this.started = true;
      if (text.startsWith("\uFEFF")) text = text.slice(1);
    }
    this.buffer += text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF still on its way.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, match.index));
      start = lineEnd.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.idBuffer = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }

  dispatch() {
    this.lastEventId = this.idBuffer;
    if (this.data.length > 0) {
      const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId };
      this.resetEvent();
      this.onEvent(event);
    } else {
      this.resetEvent();
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    function onAbort() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function isAbort(error, signal) {
  return signal?.aborted || error?.name === "AbortError";
}

/**
 * Follow a job's events until its last one (`done` or `error`), or a 204 (the stream is
 * over and nothing is missing). A dropped connection is retried with growing back-off
 * and resumed after the last event received, so no event arrives twice or goes missing.
 *
 * onEvent({type, id, data}) gets each event; onConnection(state, detail) hears
 * "open", "retrying" (with the delay in ms) and "closed".
 */
export async function followEvents(jobId, { onEvent, onConnection = () => {}, signal, after = "" }) {
  const url = apiUrl(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
  let lastEventId = after;
  let failures = 0;
  let serverRetry = null;
  for (;;) {
    let ended = false;
    const parser = new SseParser((event) => {
      lastEventId = event.id;
      failures = 0;
      onEvent(event);
      if (TERMINAL.has(event.type)) ended = true;
    }, lastEventId);
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const response = await fetch(url, { headers, signal, cache: "no-store" });
      if (response.status === 204) {
        onConnection("closed");
        return { lastEventId };
      }
      if (!response.ok) {
        const error = await errorOf(response);
        if (!RETRYABLE.has(response.status)) throw error;
        const retryAfter = Number(response.headers.get("Retry-After"));
        if (retryAfter > 0) serverRetry = retryAfter * 1000;
        throw error;
      }
      onConnection("open");
      await readInto(response, parser);
      if (parser.retry !== null) serverRetry = parser.retry;
      if (ended) {
        onConnection("closed");
        return { lastEventId };
      }
      // The server ended the stream before the job's last event (it is restarting, say):
      // resume after a short pause.
    } catch (error) {
      if (isAbort(error, signal)) throw error;
      if (error instanceof ApiError && !RETRYABLE.has(error.status)) throw error;
      if (ended) {
        onConnection("closed");
        return { lastEventId };
      }
    }
    failures += 1;
    const base = serverRetry ?? 500;
    const delay = Math.min(MAX_DELAY_MS, base * 2 ** (failures - 1));
    const jittered = Math.round(delay * (0.75 + Math.random() * 0.5));
    onConnection("retrying", jittered);
    await sleep(jittered, signal);
  }
}

async function readInto(response, parser) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
    }
    parser.push(decoder.decode());
  } finally {
    reader.releaseLock();
  }
}

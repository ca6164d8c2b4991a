// Small DOM helpers and formatters shared by the console's views. Text from the API is
// always set as text (textContent), never as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const $ = (selector) => document.querySelector(selector);

export function showError(error) {
  const text = error?.message || String(error);
  $("#banner-text").textContent = text;
  $("#banner").hidden = false;
}

export function clearError() {
  $("#banner").hidden = true;
  $("#banner-text").textContent = "";
}

/** Run `action`, showing what it throws in the banner (an aborted action says nothing). */
export async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    if (error?.name !== "AbortError") showError(error);
    return undefined;
  }
}

const number = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });

export function fmtNumber(value) {
  return value === null || value === undefined ? "–" : number.format(value);
}

export function fmtMs(value) {
  return value === null || value === undefined ? "–" : `${number.format(value)} ms`;
}

export function fmtUsd(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "$0";
  return value < 0.01 ? `$${value.toPrecision(2)}` : `$${value.toFixed(2)}`;
}

export function fmtPercent(value) {
  return value === null || value === undefined ? "–" : `${number.format(value * 100)}%`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, text: status });
}

/** A description list of [term, value] pairs (values may be nodes). */
export function facts(pairs) {
  return el(
    "dl",
    { class: "facts" },
    pairs.map(([term, value]) => el("div", {}, el("dt", { text: term }), el("dd", {}, value))),
  );
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);

/** The facts of a finished (or running) job: usage, cost and timings. */
export function jobFacts(job) {
  const pairs = [
    ["Status", statusBadge(job.status)],
    ["Model", job.requested_model && job.requested_model !== job.model
      ? `${job.model} (asked: ${job.requested_model})` : job.model],
    ["Finish reason", job.finish_reason ?? "–"],
    ["Input tokens", fmtNumber(job.usage?.input_tokens)],
    ["Output tokens", fmtNumber(job.usage?.output_tokens)],
    ["Cost", fmtUsd(job.usage?.cost_usd)],
    ["Queue", fmtMs(job.timings?.queue_ms)],
    ["Time to first token", fmtMs(job.timings?.ttft_ms)],
    ["Duration", fmtMs(job.timings?.duration_ms)],
    ["Tokens per second", fmtNumber(job.timings?.tokens_per_second)],
    ["Cached", job.cached ? "yes" : "no"],
    ["Attempts", fmtNumber(job.attempts)],
    ["Created", fmtTime(job.created_at)],
    ["Finished", fmtTime(job.finished_at)],
  ];
  if (job.error) pairs.push(["Error", `${job.error.type}: ${job.error.message}`]);
  if (job.dropped_messages) pairs.push(["Dropped messages", fmtNumber(job.dropped_messages)]);
  return facts(pairs);
}

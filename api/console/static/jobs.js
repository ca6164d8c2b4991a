// Jobs: the tenant's jobs, newest first; one job with its output, feedback and events.

import { api } from "./api.js";
import { feedbackBox } from "./feedback.js";
import { followEvents } from "./sse.js";
import { $, el, fmtNumber, fmtTime, fmtUsd, guarded, jobFacts, statusBadge, TERMINAL } from "./ui.js";

const PAGE = 20;
const MAX_EVENT_ROWS = 500;
let cursor = null;
let loads = 0;
let replay = null; // the AbortController of the open job's event replay

function row(job) {
  const tokens = job.usage?.output_tokens;
  return el(
    "tr",
    {},
    el("td", { text: fmtTime(job.created_at) }),
    el("td", {}, el("a", { href: `#/jobs/${job.id}`, class: "mono", text: job.id })),
    el("td", { text: job.model }),
    el("td", {}, statusBadge(job.status)),
    el("td", { class: "num", text: fmtNumber(tokens) }),
    el("td", { class: "num", text: fmtUsd(job.usage?.cost_usd) }),
  );
}

async function loadPage(reset) {
  if (reset) cursor = null;
  const asked = ++loads;
  const page = await api.jobs({ status: $("#jobs-status").value, cursor, limit: PAGE });
  if (asked !== loads) return; // a newer load (another filter, say) has the table now
  const rows = $("#jobs-rows");
  if (reset) rows.replaceChildren();
  rows.append(...page.data.map(row));
  cursor = page.next_cursor;
  $("#jobs-more").hidden = !cursor;
  $("#jobs-empty").hidden = rows.children.length > 0;
}

export function showJobs() {
  return guarded(() => loadPage(true));
}

export function leaveJob() {
  replay?.abort();
  replay = null;
}

function eventRow(event) {
  return el(
    "tr",
    {},
    el("td", { class: "mono", text: event.id }),
    el("td", { text: event.type }),
    el("td", { class: "mono", text: event.data }),
  );
}

async function render(id) {
  const job = await api.job(id);
  const detail = $("#job-detail");
  $("#job-title").textContent = `Job ${job.id}`;
  const actions = el("p", { class: "actions" });
  if (!TERMINAL.has(job.status)) {
    actions.append(
      el("button", {
        type: "button",
        class: "danger",
        id: "job-cancel",
        text: "Cancel job",
        onclick: () => guarded(async () => {
          await api.cancel(job.id);
        }),
      }),
    );
  }
  detail.replaceChildren(jobFacts(job), actions);
  $("#job-output").textContent = job.output ?? "";
  $("#job-feedback").replaceChildren(TERMINAL.has(job.status) ? feedbackBox(job) : "");
  return job;
}

async function replayEvents(job, signal) {
  const table = $("#job-events");
  const live = !TERMINAL.has(job.status);
  const output = $("#job-output");
  let shown = 0;
  let hidden = 0;
  if (live) output.textContent = "";
  await followEvents(job.id, {
    signal,
    onEvent: (event) => {
      if (shown < MAX_EVENT_ROWS) {
        table.append(eventRow(event));
        shown += 1;
      } else {
        hidden += 1;
      }
      if (live && event.type === "token") output.append(JSON.parse(event.data).text);
      if (live && event.type === "reset") output.textContent = "";
    },
  });
  if (hidden) table.append(el("tr", {}, el("td", { colspan: "3", class: "muted", text: `… and ${hidden} more events` })));
  if (live && !signal.aborted) await render(job.id); // the job ended while we watched
}

export function showJob(id) {
  leaveJob();
  const controller = new AbortController();
  replay = controller;
  $("#job-detail").replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  $("#job-output").textContent = "";
  $("#job-feedback").replaceChildren();
  $("#job-events").replaceChildren();
  return guarded(async () => {
    const job = await render(id);
    await replayEvents(job, controller.signal);
  });
}

export function setupJobs() {
  $("#jobs-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    showJobs();
  });
  $("#jobs-status").addEventListener("change", () => showJobs());
  $("#jobs-more").addEventListener("click", () => guarded(() => loadPage(false)));
}

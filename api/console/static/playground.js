// Playground: submit a job, watch its tokens arrive, cancel it, rate it.

import { api } from "./api.js";
import { feedbackBox } from "./feedback.js";
import { followEvents } from "./sse.js";
import { $, clearError, el, guarded, jobFacts, showError } from "./ui.js";

const MODEL_STORE = "inferq.model";
const ROLES = ["system", "user", "assistant"];
let running = null; // {id, controller}
let messageCount = 0;

export async function loadModels() {
  const select = $("#model");
  const { data } = await api.models();
  const wanted = localStorage.getItem(MODEL_STORE);
  select.replaceChildren(...data.map((model) => el("option", { value: model.id, text: model.id })));
  if (data.some((model) => model.id === wanted)) select.value = wanted;
}

function addMessage(role = "user", content = "") {
  const n = ++messageCount;
  const roleSelect = el(
    "select",
    { class: "message-role", "aria-label": `Role of message ${n}` },
    ROLES.map((r) => el("option", { value: r, text: r, selected: r === role })),
  );
  const text = el("textarea", { class: "message-content", rows: "2", "aria-label": `Content of message ${n}` });
  text.value = content;
  const item = el("li", { class: "message" }, roleSelect, text);
  const remove = el("button", {
    type: "button",
    class: "secondary",
    "aria-label": `Remove message ${n}`,
    text: "Remove",
    onclick: () => item.remove(),
  });
  item.append(remove);
  $("#messages").append(item);
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  const chat = mode() === "chat";
  $("#prompt-field").hidden = chat;
  $("#chat-field").hidden = !chat;
}

function requestBody() {
  const body = { model: $("#model").value };
  if (mode() === "chat") {
    body.messages = [...document.querySelectorAll("#messages .message")]
      .map((item) => ({
        role: item.querySelector(".message-role").value,
        content: item.querySelector(".message-content").value,
      }))
      .filter((message) => message.content.trim() !== "");
    if (body.messages.length === 0) throw new Error("Write at least one message.");
  } else {
    body.prompt = $("#prompt").value;
    if (body.prompt.trim() === "") throw new Error("Write a prompt.");
  }
  const maxTokens = $("#max-tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const temperature = $("#temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  return body;
}

function setState(text) {
  $("#run-state").textContent = text;
}

function setRunning(job) {
  running = job;
  $("#submit").disabled = job !== null;
  $("#cancel").disabled = job === null;
}

async function run(body) {
  const output = $("#output");
  output.replaceChildren();
  $("#run-result").replaceChildren();
  setState("Submitting…");
  const job = await api.submit(body);
  localStorage.setItem(MODEL_STORE, body.model);
  const controller = new AbortController();
  setRunning({ id: job.id, controller });
  $("#run-result").append(
    el("p", {}, "Job ", el("a", { href: `#/jobs/${job.id}`, class: "job-link", text: job.id })),
  );
  setState(job.status);
  try {
    await followEvents(job.id, {
      signal: controller.signal,
      onEvent: (event) => onEvent(event, output),
      onConnection: (state, delay) => {
        if (state === "retrying") setState(`connection lost; reconnecting in ${(delay / 1000).toFixed(1)} s…`);
      },
    });
  } finally {
    setRunning(null);
  }
  const finished = await api.job(job.id);
  setState(finished.status);
  $("#run-result").append(jobFacts(finished), feedbackBox(finished));
}

function onEvent(event, output) {
  const data = JSON.parse(event.data);
  if (event.type === "token") {
    output.append(data.text);
  } else if (event.type === "reset") {
    output.replaceChildren();
    setState(`retrying (attempt ${data.attempt})`);
  } else if (event.type === "status") {
    setState(data.status);
  } else if (event.type === "done") {
    setState(data.status);
  } else if (event.type === "error") {
    setState(`failed: ${data.type}`);
    showError(`The job failed: ${data.message || data.type}`);
  }
  output.normalize();
}

export function setupPlayground() {
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", showMode);
  }
  addMessage("system", "You are a concise assistant.");
  addMessage("user", "Write a haiku about queues.");
  $("#add-message").addEventListener("click", () => addMessage());
  $("#submit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearError();
    guarded(async () => {
      try {
        await run(requestBody());
      } catch (error) {
        setState("");
        throw error;
      }
    });
  });
  $("#cancel").addEventListener("click", () =>
    guarded(async () => {
      if (!running) return;
      setState("cancelling…");
      await api.cancel(running.id);
    }),
  );
}

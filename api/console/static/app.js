// The console's entry: the key, the banner and the sections (#/playground, #/jobs,
// #/jobs/{id}, #/dashboard). The address holds only the section, never the key.

import { key } from "./api.js";
import { setupDashboard, showDashboard } from "./dashboard.js";
import { leaveJob, setupJobs, showJob, showJobs } from "./jobs.js";
import { loadModels, setupPlayground } from "./playground.js";
import { $, clearError, guarded } from "./ui.js";

const VIEWS = ["playground", "jobs", "job", "dashboard"];

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [section, id] = hash.split("/");
  if (section === "jobs" && id) return { view: "job", tab: "jobs", id: decodeURIComponent(id) };
  if (VIEWS.includes(section) && section !== "job") return { view: section, tab: section };
  return { view: "playground", tab: "playground" };
}

function show() {
  const { view, tab, id } = route();
  for (const name of VIEWS) $(`#view-${name}`).hidden = name !== view;
  for (const link of document.querySelectorAll(".tabs a")) {
    if (link.dataset.tab === tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view !== "job") leaveJob();
  if (!key.get()) return;
  if (view === "jobs") showJobs();
  else if (view === "job") showJob(id);
  else if (view === "dashboard") guarded(showDashboard);
}

function showKeyState() {
  const secret = key.get();
  const state = $("#key-state");
  if (!secret) {
    state.textContent = "No key: paste one to start.";
  } else {
    const where = key.remembered() ? "remembered on this device" : "kept for this tab";
    state.textContent = `Key ${secret.slice(0, 8)}… in use (${where}).`;
  }
  $("#key-forget").disabled = !secret;
  $("#key-remember").checked = key.remembered();
}

async function useKey() {
  showKeyState();
  clearError();
  await guarded(loadModels);
  show();
}

function setupKey() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const secret = $("#key-input").value.trim();
    if (!secret) return;
    key.set(secret, $("#key-remember").checked);
    $("#key-input").value = "";
    useKey();
  });
  $("#key-forget").addEventListener("click", () => {
    key.forget();
    location.reload(); // nothing read with the key stays on the page
  });
}

function main() {
  $("#banner-close").addEventListener("click", clearError);
  setupKey();
  setupPlayground();
  setupJobs();
  setupDashboard(() => guarded(showDashboard));
  window.addEventListener("hashchange", () => {
    clearError();
    show();
  });
  if (key.get()) {
    useKey();
  } else {
    showKeyState();
    show();
  }
}

main();

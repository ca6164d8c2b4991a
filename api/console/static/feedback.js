// Thumbs up or down on a finished job, with a comment; and the judge's score where it has one.

import { api } from "./api.js";
import { el, facts, guarded } from "./ui.js";

let boxes = 0;

function ratingText(rating) {
  return rating === 1 ? "thumbs up" : rating === -1 ? "thumbs down" : String(rating);
}

function thumb(direction) {
  return el(
    "button",
    { type: "button", class: "secondary thumb", "aria-pressed": "false", "aria-label": `Thumbs ${direction}` },
    el("img", { src: `console/thumb-${direction}.svg`, alt: "", width: "20", height: "20" }),
    direction === "up" ? "Good" : "Bad",
  );
}

/** What the job carries: the feedback given and the judge's evaluation. */
function recorded(job) {
  const pairs = [];
  if (job.feedback) {
    const comment = job.feedback.comment ? ` — “${job.feedback.comment}”` : "";
    pairs.push(["Feedback", `${ratingText(job.feedback.rating)}${comment}`]);
  }
  if (job.evaluation) {
    const { score, rationale, judge_model: judge, error } = job.evaluation;
    const by = judge ? ` (${judge})` : "";
    if (score === null || score === undefined) pairs.push(["Judge score", `none${by}: ${error ?? "unreadable"}`]);
    else pairs.push(["Judge score", `${score}/5${by}`]);
    if (rationale) pairs.push(["Judge's rationale", rationale]);
  }
  return pairs.length ? facts(pairs) : null;
}

/** A feedback form for `job`; `onSaved(job)` gets the job as stored after the feedback. */
export function feedbackBox(job, onSaved = () => {}) {
  const id = ++boxes;
  let rating = job.feedback?.rating ?? 0;
  const up = thumb("up");
  const down = thumb("down");
  const comment = el("input", { id: `feedback-comment-${id}`, type: "text", maxlength: "2000",
    class: "feedback-comment", value: job.feedback?.comment ?? "" });
  const send = el("button", { type: "submit", class: "feedback-send", text: "Send feedback", disabled: !rating });
  const state = el("span", { class: "muted feedback-state", role: "status" });
  const shown = el("div", { class: "feedback-recorded" }, recorded(job));

  function choose(value) {
    rating = value;
    up.setAttribute("aria-pressed", String(value === 1));
    down.setAttribute("aria-pressed", String(value === -1));
    send.disabled = false;
  }
  if (rating) choose(rating);
  up.addEventListener("click", () => choose(1));
  down.addEventListener("click", () => choose(-1));

  const form = el(
    "form",
    { class: "feedback", "aria-label": "Feedback on this job" },
    el("span", { class: "label", text: "Was this good?" }),
    up,
    down,
    el("label", { for: comment.id, text: "Comment" }),
    comment,
    send,
    state,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      send.disabled = true;
      state.textContent = "Sending…";
      try {
        await api.feedback(job.id, rating, comment.value.trim());
        const stored = await api.job(job.id);
        shown.replaceChildren(recorded(stored) ?? "");
        state.textContent = "Thanks, feedback saved.";
        onSaved(stored);
      } catch (error) {
        state.textContent = "";
        throw error;
      } finally {
        send.disabled = false;
      }
    });
  });
  return el("div", { class: "feedback-box" }, el("h3", { text: "Feedback" }), form, shown);
}

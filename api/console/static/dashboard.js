// Dashboard: the last days of GET /v1/stats as charts (uPlot), each with its figures as a
// table for keyboards and screen readers.

import { api } from "./api.js";
import { $, el, fmtMs, fmtNumber, fmtPercent, fmtUsd } from "./ui.js";

const DAY = 86400;
const PALETTE = ["#1f5fbf", "#c2410c", "#047857", "#7c3aed", "#b91c1c", "#0e7490", "#a16207", "#be185d"];
const MAX_USERS = 7;
const charts = new Map(); // container id → uPlot

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** The days of the range, oldest first, as "YYYY-MM-DD" (UTC, like the stats). */
function daysBack(count) {
  const today = new Date();
  const days = [];
  for (let i = count - 1; i >= 0; i -= 1) days.push(isoDay(new Date(today.getTime() - i * DAY * 1000)));
  return days;
}

const dayOf = (row) => String(row.day).slice(0, 10);
const seconds = (day) => Date.parse(`${day}T00:00:00Z`) / 1000;

/** rows grouped by `key(row)`, each group as a Map day → row. */
function byGroup(rows, key) {
  const groups = new Map();
  for (const row of rows) {
    const name = key(row);
    if (!groups.has(name)) groups.set(name, new Map());
    groups.get(name).set(dayOf(row), row);
  }
  return groups;
}

function tableOf(days, series) {
  return el(
    "details",
    { class: "chart-table" },
    el("summary", { text: "Figures" }),
    el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "day" }),
          series.map((s) => el("th", { scope: "col", class: "num", text: s.label })))),
        el("tbody", {}, days.map((day, i) => el("tr", {}, el("th", { scope: "row", text: day }),
          series.map((s) => el("td", { class: "num", text: s.format(s.values[i]) }))))),
      ),
    ),
  );
}

/** An axis tick: few digits, however small the numbers (costs are fractions of a cent). */
function axisNumber(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1000) return fmtNumber(value);
  if (magnitude >= 1) return String(Number(value.toFixed(2)));
  return String(Number(value.toPrecision(2)));
}

function draw(id, days, series, { bars = false, yLabel = "" } = {}) {
  const box = $(`#${id}`);
  charts.get(id)?.destroy();
  box.replaceChildren();
  const xs = days.map(seconds);
  const width = Math.max(box.clientWidth, 200);
  const options = {
    width,
    height: 220,
    legend: { live: false },
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true, range: () => [xs[0] - DAY / 2, xs[xs.length - 1] + DAY / 2] } },
    axes: [
      { space: 50, incrs: [DAY, 2 * DAY, 7 * DAY, 14 * DAY], values: (u, splits) => splits.map((s) => isoDay(new Date(s * 1000)).slice(5)) },
      { label: yLabel, size: 64, values: (u, splits) => splits.map(axisNumber) },
    ],
    series: [
      { label: "day", value: (u, v) => (v === null ? "–" : isoDay(new Date(v * 1000))) },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color ?? PALETTE[i % PALETTE.length],
        fill: bars ? `${s.color ?? PALETTE[i % PALETTE.length]}cc` : undefined,
        width: 2,
        dash: s.dash,
        spanGaps: false,
        points: { show: true, size: 6 },
        paths: bars ? uPlot.paths.bars({ size: [s.barSize ?? 0.6, 60], align: 0 }) : undefined,
        value: (u, v) => s.format(v),
      })),
    ],
  };
  const chart = new uPlot(options, [xs, ...series.map((s) => s.values)], box);
  charts.set(id, chart);
  box.append(tableOf(days, series));
}

function tile(label, value) {
  return el("div", { class: "tile" }, el("span", { class: "tile-value", text: value }), el("span", { class: "tile-label", text: label }));
}

/** The period's totals: the one row of the ungrouped stats (none when no job ran). */
function summary(total) {
  const row = total ?? {};
  const score = row.judge_score_avg;
  $("#summary").replaceChildren(
    tile("jobs", fmtNumber(row.jobs ?? 0)),
    tile("succeeded", fmtNumber(row.succeeded ?? 0)),
    tile("failed", fmtNumber(row.failed ?? 0)),
    tile("error rate", fmtPercent(row.error_rate)),
    tile("cost", fmtUsd(row.cost_usd ?? 0)),
    tile("cache hit rate", fmtPercent(row.cache_hit_rate)),
    tile("TTFT p50 · p95", row.ttft_ms ? `${fmtMs(row.ttft_ms.p50)} · ${fmtMs(row.ttft_ms.p95)}` : "–"),
    tile("feedback (up · down)", `${row.feedback?.up ?? 0} · ${row.feedback?.down ?? 0}`),
    tile("judge score (1–5)", score === null || score === undefined ? "–" : fmtNumber(score)),
  );
}

function jobsChart(days, rows) {
  const perDay = byGroup(rows, () => "all").get("all") ?? new Map();
  const count = (field) => days.map((d) => perDay.get(d)?.[field] ?? 0);
  draw("chart-jobs", days, [
    { label: "jobs", values: count("jobs"), format: fmtNumber, color: "#1f5fbf" },
    { label: "errors", values: count("failed"), format: fmtNumber, color: "#b91c1c", barSize: 0.3 },
  ], { bars: true, yLabel: "jobs" });
}

function ratesChart(days, rows) {
  const perDay = byGroup(rows, () => "all").get("all") ?? new Map();
  const rate = (field) => days.map((d) => {
    const value = perDay.get(d)?.[field];
    return value === undefined || value === null ? null : value * 100;
  });
  const percent = (v) => (v === null || v === undefined ? "–" : `${fmtNumber(v)}%`);
  draw("chart-rates", days, [
    { label: "cache hit rate", values: rate("cache_hit_rate"), format: percent, color: "#047857" },
    { label: "error rate", values: rate("error_rate"), format: percent, color: "#b91c1c" },
  ], { yLabel: "%" });
}

function ttftChart(days, rows) {
  const models = byGroup(rows, (row) => row.model ?? "(none)");
  const series = [];
  [...models.keys()].sort().forEach((model, i) => {
    const color = PALETTE[i % PALETTE.length];
    const perDay = models.get(model);
    for (const [q, dash] of [["p50", undefined], ["p95", [6, 4]]]) {
      series.push({
        label: `${model} ${q}`,
        values: days.map((d) => perDay.get(d)?.ttft_ms?.[q] ?? null),
        format: fmtMs,
        color,
        dash,
      });
    }
  });
  draw("chart-ttft", days, series, { yLabel: "ms" });
}

function costChart(days, rows) {
  const users = byGroup(rows, (row) => row.user ?? "(no user)");
  const total = (name) => [...users.get(name).values()].reduce((t, r) => t + (r.cost_usd ?? 0), 0);
  const names = [...users.keys()].sort((a, b) => total(b) - total(a));
  const shown = names.slice(0, MAX_USERS);
  const rest = names.slice(MAX_USERS);
  const costs = (group) => days.map((d) => group.reduce((t, name) => t + (users.get(name).get(d)?.cost_usd ?? 0), 0));
  const series = shown.map((name) => ({ label: name, values: costs([name]), format: fmtUsd }));
  if (rest.length) series.push({ label: `${rest.length} others`, values: costs(rest), format: fmtUsd });
  draw("chart-cost", days, series, { yLabel: "USD" });
}

export async function showDashboard() {
  const days = daysBack(Number($("#stats-days").value));
  const range = { from: days[0], to: days[days.length - 1] };
  $("#stats-state").textContent = "Loading…";
  try {
    const [total, perDay, perModel, perUser] = await Promise.all([
      api.stats(range),
      api.stats({ ...range, group_by: "day" }),
      api.stats({ ...range, group_by: "model,day" }),
      api.stats({ ...range, group_by: "user,day" }),
    ]);
    summary(total.data[0]);
    jobsChart(days, perDay.data);
    ttftChart(days, perModel.data);
    costChart(days, perUser.data);
    ratesChart(days, perDay.data);
    $("#stats-state").textContent = `${range.from} to ${range.to} (UTC)`;
  } catch (error) {
    $("#stats-state").textContent = "";
    throw new Error(`Stats could not be loaded: ${error.message}`);
  }
}

export function setupDashboard(refresh) {
  $("#stats-range").addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  $("#stats-days").addEventListener("change", () => refresh());
  const resize = new ResizeObserver(() => {
    for (const [id, chart] of charts) {
      const width = Math.max($(`#${id}`).clientWidth, 200);
      if (width !== chart.width) chart.setSize({ width, height: 220 });
    }
  });
  resize.observe($("#view-dashboard"));
}

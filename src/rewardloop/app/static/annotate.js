// The annotate page: keyboard and click choices, k-way ranking by keys or drag, submission
// through the JSON API with the session's CSRF token. No inline script (strict CSP).
"use strict";
(function () {
  const task = document.getElementById("task");
  if (!task) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const taskId = Number(task.dataset.taskId);
  const kind = task.dataset.kind;
  const answers = Array.from(task.querySelectorAll(".answer"));
  const ids = answers.map((a) => Number(a.dataset.id));
  const status = document.getElementById("status");
  const started = performance.now();
  let timeMs = null;
  // One key per page view: pressing twice replays the same judgment instead of adding one.
  const key = Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (b) => b.toString(16).padStart(2, "0")).join("");
  let busy = false;
  let groups = [];  // k-way ranking built so far: groups of response ids, best first
  let tieNext = false;

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function post(url, body) {
    const resp = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!resp.ok) {
      let detail = resp.statusText;
      try { detail = (await resp.json()).detail; } catch (e) { /* not JSON */ }
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
  }

  async function submit(ranking) {
    if (busy) return;
    busy = true;
    const chosen = task.querySelector('input[name="strength"]:checked');
    const rationale = document.getElementById("rationale").value.trim();
    // Measured once: a retry with the same key must send the same judgment (else 409).
    if (timeMs === null) timeMs = Math.round(performance.now() - started);
    say("Saving…");
    try {
      await post("/api/judgments", {
        task_id: taskId, ranking: ranking, idempotency_key: key,
        strength: chosen ? chosen.value : null, rationale: rationale || null,
        time_ms: timeMs,
      });
      say("Saved.");
      window.location.reload();
    } catch (err) {
      busy = false;
      say("Not saved: " + err.message, true);
    }
  }

  async function skip() {
    if (busy) return;
    busy = true;
    try {
      await post("/api/tasks/" + taskId + "/skip");
      window.location.reload();
    } catch (err) {
      busy = false;
      say("Could not skip: " + err.message, true);
    }
  }

  function pairwise(choice) {
    if (choice === "1") submit([[ids[0]], [ids[1]]]);
    else if (choice === "2") submit([[ids[1]], [ids[0]]]);
    else if (choice === "t") submit([[ids[0], ids[1]]]);
    else if (choice === "s") skip();
  }

  function showRanking() {
    const list = document.getElementById("rank-list");
    list.textContent = "";
    const label = new Map(answers.map((a) => [Number(a.dataset.id),
      "Answer " + a.dataset.label]));
    answers.forEach((a) => { a.querySelector(".rank-badge").textContent = ""; });
    groups.forEach((group, i) => {
      const li = document.createElement("li");
      li.textContent = group.map((id) => label.get(id)).join(" = ");
      list.appendChild(li);
      group.forEach((id) => {
        const a = answers[ids.indexOf(id)];
        a.querySelector(".rank-badge").textContent = "#" + (i + 1);
      });
    });
  }

  function pick(n) {
    const id = ids[n - 1];
    if (id === undefined || groups.some((g) => g.includes(id))) return;
    if (tieNext && groups.length) groups[groups.length - 1].push(id);
    else groups.push([id]);
    tieNext = false;
    showRanking();
  }

  // With 10 or more answers every answer's key has two digits (01, 02, ... as the page shows),
  // so a number never waits to see whether another digit follows.
  const width = String(ids.length).length;
  let digits = "";

  function typeDigit(d) {
    digits += d;
    if (digits.length < width) { say("Answer " + digits + "…"); return; }
    pick(Number(digits));
    digits = "";
    say("");
  }

  function ranking(choice) {
    digits = "";
    if (choice === "submit") {
      const placed = groups.flat().length;
      if (placed < ids.length - 1) { say("Rank all answers first.", true); return; }
      const rest = ids.filter((id) => !groups.some((g) => g.includes(id)));
      submit(rest.length ? groups.concat([rest]) : groups);
    } else if (choice === "clear") { groups = []; showRanking(); }
    else if (choice === "s") skip();
  }

  const choose = kind === "pairwise" ? pairwise : ranking;
  task.querySelectorAll("button[data-choice]").forEach((b) => {
    b.addEventListener("click", () => choose(b.dataset.choice));
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("textarea, input") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key.toLowerCase();
    if (kind === "pairwise") {
      if (["1", "2", "t", "s"].includes(k)) { ev.preventDefault(); pairwise(k); }
      return;
    }
    if (/^[0-9]$/.test(k)) { typeDigit(k); ev.preventDefault(); return; }
    if (k === "t") tieNext = true;
    else if (k === "backspace" && digits) { digits = ""; say(""); }
    else if (k === "backspace") { groups.pop(); showRanking(); }
    else if (k === "enter") ranking("submit");
    else if (k === "s") skip();
    else return;
    ev.preventDefault();
  });

  // Drag an answer onto another to place it on its own just before that one's group; every
  // other group (a tie included) stays as it was.
  let dragged = null;
  answers.forEach((a) => {
    a.addEventListener("dragstart", () => { dragged = Number(a.dataset.id); });
    a.addEventListener("dragover", (ev) => ev.preventDefault());
    a.addEventListener("drop", (ev) => {
      ev.preventDefault();
      if (kind === "pairwise" || dragged === null) return;
      const target = Number(a.dataset.id);
      if (target === dragged) return;
      const placed = groups.flat();
      const all = groups.map((g) => g.slice())
        .concat(ids.filter((id) => !placed.includes(id)).map((id) => [id]));
      const rest = all.map((g) => g.filter((id) => id !== dragged)).filter((g) => g.length);
      const at = rest.findIndex((g) => g.includes(target));
      rest.splice(at, 0, [dragged]);
      groups = rest;
      showRanking();
    });
  });
})();

// The annotate page: choices by click, tap or key, k-way ranking by buttons, keys or drag,
// submission through the JSON API with the session's CSRF token, lease renewal while the
// annotator is active. No inline script (strict CSP).
"use strict";
(function () {
  const task = document.getElementById("task");
  if (!task) return;
  // The next task is loaded by reloading the page: it must open at its top, not where the last
  // one was left (the browser restores the scroll position otherwise).
  history.scrollRestoration = "manual";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const taskId = Number(task.dataset.taskId);
  const kind = task.dataset.kind;
  const answers = Array.from(task.querySelectorAll(".answer"));
  const ids = answers.map((a) => Number(a.dataset.id));
  const status = document.getElementById("status");
  const rationale = document.getElementById("rationale");
  const strengths = Array.from(task.querySelectorAll('input[name="strength"]'));
  const started = performance.now();
  const DRAFT = "rewardloop.draft." + taskId;  // sessionStorage: what was typed, kept on reload
  const FLASH = "rewardloop.flash";  // sessionStorage: "Saved." shown on the next task
  // One key per page view: sending again replays the same judgment instead of adding one.
  const key = Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (b) => b.toString(16).padStart(2, "0")).join("");
  let pending = null;  // the judgment body sent and not definitely refused: resent unchanged
  let busy = false;
  let finished = false;

  function stored(area, name, value) {
    try {
      if (value === undefined) return window[area].getItem(name);
      if (value === null) window[area].removeItem(name); else window[area].setItem(name, value);
    } catch (e) { /* storage disabled: nothing is remembered */ }
    return null;
  }

  // -- the status line; an action is a button ({label, run}) or a link ({label, href}) -------
  function say(text, isError, ...actions) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
    actions.forEach((act) => {
      const el = document.createElement(act.href ? "a" : "button");
      el.textContent = act.label;
      if (act.href) el.href = act.href;
      else { el.type = "button"; el.className = "secondary"; el.addEventListener("click", act.run); }
      status.append(" ", el);
    });
  }
  const RETRY = { label: "Retry", run: () => resend() };
  const RELOAD = { label: "Reload", run: () => window.location.reload() };
  // Logging in again comes back to this page, where the draft is restored (same tab).
  const LOGIN = { label: "Log in again",
    href: "/login?next=" + encodeURIComponent(location.pathname + location.search) };

  function next(message) {
    finished = true;
    stored("sessionStorage", DRAFT, null);
    stored("sessionStorage", FLASH, message);
    say(message + " Loading the next task…");
    window.location.reload();
  }

  // -- settings remembered in localStorage -------------------------------------------------
  function showAs(view) {
    task.classList.toggle("show-plain", view === "plain");
    task.querySelector('input[name="view"][value="' + view + '"]').checked = true;
  }
  showAs(stored("localStorage", "rewardloop.view") === "plain" ? "plain" : "formatted");
  task.querySelectorAll('input[name="view"]').forEach((r) => r.addEventListener("change", () => {
    stored("localStorage", "rewardloop.view", r.value);
    showAs(r.value);
  }));
  const shortcutBox = document.getElementById("shortcuts");
  let shortcutsOn = stored("localStorage", "rewardloop.shortcuts") !== "off";
  function setShortcuts(on) {
    shortcutsOn = on;
    shortcutBox.checked = on;
    task.classList.toggle("no-shortcuts", !on);
  }
  setShortcuts(shortcutsOn);
  shortcutBox.addEventListener("change", () => {
    stored("localStorage", "rewardloop.shortcuts", shortcutBox.checked ? "on" : "off");
    setShortcuts(shortcutBox.checked);
  });

  // -- what was typed survives a reload (an expired session, a stale page) -------------------
  function saveDraft() {
    const chosen = strengths.find((r) => r.checked);
    stored("sessionStorage", DRAFT, JSON.stringify(
      { rationale: rationale.value, strength: chosen ? chosen.value : "" }));
  }
  const draft = JSON.parse(stored("sessionStorage", DRAFT) || "null");
  if (draft) {
    rationale.value = draft.rationale || "";
    strengths.forEach((r) => { r.checked = r.value === (draft.strength || ""); });
  }
  rationale.addEventListener("input", saveDraft);
  strengths.forEach((r) => r.addEventListener("change", saveDraft));

  function freeze(on) {
    rationale.disabled = on;
    strengths.forEach((r) => { r.disabled = on; });
  }

  // -- talking to the server -----------------------------------------------------------------
  async function send(url, body) {
    const resp = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let detail = "";
    try { const got = await resp.json(); if (typeof got.detail === "string") detail = got.detail; }
    catch (e) { /* no JSON body */ }
    return { status: resp.status, detail: detail };
  }

  // A lost connection or a busy server (503) is tried again with the identical request.
  async function sendRetrying(url, body) {
    for (let attempt = 1; ; attempt++) {
      let answer = { status: 0, detail: "" };
      try { answer = await send(url, body); } catch (e) { /* network error */ }
      if ((answer.status !== 0 && answer.status !== 503) || attempt === 3) return answer;
      say("The connection failed; trying again…");
      await new Promise((done) => setTimeout(done, 1000 * attempt));
    }
  }

  // What a refusal means, in words, and what the annotator can do. True when the page goes on.
  function explain(answer, what) {
    const d = answer.detail;
    if (answer.status === 0 || answer.status >= 500) {
      say("Could not reach the server, so the " + what + " may not be saved yet. Check your " +
        "connection, then press Retry (your choice is kept).", true, RETRY);
    } else if (answer.status === 401) {
      say("Your session has ended, so this was not saved. Log in again: you come back to " +
        "this task, and what you typed is kept.", true, LOGIN);
    } else if (answer.status === 403 && /csrf/i.test(d)) {
      say("This page is out of date (you logged in again elsewhere). Reload it: what you " +
        "typed is kept.", true, RELOAD);
    } else if (/already judged|already used for a different/.test(d)) {
      next("This task was already saved.");
    } else if (answer.status === 403 || answer.status === 404 ||
               /all the judgments it needs|someone else took it/.test(d)) {
      next("The time for that task ran out and someone else took it.");
    } else {
      return false;
    }
    return true;
  }

  async function resend() {
    if (busy || finished || !pending) return;
    busy = true;
    say("Saving…");
    const answer = await sendRetrying("/api/judgments", pending);
    busy = false;
    if (answer.status === 200 || answer.status === 201) { next("Saved."); return; }
    if (explain(answer, "judgment")) return;
    pending = null;  // refused for good: the annotator may change their choice
    freeze(false);
    say("Not saved: the server refused it (" + (answer.detail || "error " + answer.status) +
      ").", true);
  }

  function submit(ranking, withStrength) {
    if (busy || finished) return;
    if (!pending) {
      const chosen = strengths.find((r) => r.checked);
      pending = {
        task_id: taskId, ranking: ranking, idempotency_key: key,
        strength: withStrength && chosen && chosen.value ? chosen.value : null,
        rationale: rationale.value.trim() || null,
        time_ms: Math.round(performance.now() - started),
      };
      freeze(true);  // a retry must send exactly this judgment
    }
    resend();
  }

  async function skip() {
    if (busy || finished) return;
    if (pending) { say("Your choice is still being sent: press Retry.", true, RETRY); return; }
    busy = true;
    const answer = await sendRetrying("/api/tasks/" + taskId + "/skip");
    busy = false;
    if (answer.status === 204) next("Skipped.");
    else if (answer.status === 404) next("That task was no longer reserved for you.");
    else if (!explain(answer, "skip")) say("Could not skip: " + answer.detail, true);
  }

  let skipArmed = false;
  function askSkip() {
    if (skipArmed) { skipArmed = false; skip(); return; }
    skipArmed = true;
    say("Skip this task? You will not be offered it again. Press s again to skip, or Escape " +
      "to stay.");
  }

  // -- pairwise ------------------------------------------------------------------------------
  function pairwise(choice) {
    if (choice === "1") submit([[ids[0]], [ids[1]]], true);
    else if (choice === "2") submit([[ids[1]], [ids[0]]], true);
    else if (choice === "t") submit([[ids[0], ids[1]]], false);  // strength means nothing here
    else if (choice === "s") skip();
  }

  // -- ranking -------------------------------------------------------------------------------
  let groups = [];  // the ranking built so far: groups of response ids, best first
  let tieNext = false;
  const labelOf = (id) => "Answer " + answers[ids.indexOf(id)].dataset.label;
  const isPlaced = (id) => groups.some((g) => g.includes(id));
  const unplaced = () => ids.filter((id) => !isPlaced(id));
  function ordinal(n) {
    const tail = n % 100 >= 11 && n % 100 <= 13 ? "th" : ["th", "st", "nd", "rd"][n % 10] || "th";
    return n + tail;
  }

  function showRanking() {
    const list = document.getElementById("rank-list");
    list.textContent = "";
    groups.forEach((group) => {
      const li = document.createElement("li");
      li.textContent = group.map(labelOf).join(" = ");
      list.appendChild(li);
    });
    answers.forEach((a, i) => {
      const at = groups.findIndex((g) => g.includes(ids[i]));
      a.querySelector(".rank-badge").textContent = at < 0 ? "unranked" : "#" + (at + 1);
      a.classList.toggle("unplaced", at < 0);
      a.querySelectorAll(".place button").forEach((b) => { b.disabled = at >= 0; });
    });
    const rest = unplaced();
    document.getElementById("unranked").textContent =
      rest.length ? "Not ranked yet: " + rest.map(labelOf).join(", ") + "." : "";
  }

  function place(id, tie) {
    if (id === undefined || isPlaced(id)) return;
    if (tie && groups.length) {
      const last = groups[groups.length - 1];
      say(labelOf(id) + " ties with " + last.map(labelOf).join(" and ") + ", ranked " +
        ordinal(groups.length) + ".");
      last.push(id);
    } else {
      groups.push([id]);
      say(labelOf(id) + " ranked " + ordinal(groups.length) + ".");
    }
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
    const n = Number(digits);
    digits = "";
    place(ids[n - 1], tieNext);
  }

  function cancelTyping() {
    const had = digits || tieNext || skipArmed;
    digits = "";
    tieNext = false;
    skipArmed = false;
    if (had) say("");
    return had;
  }

  function askTie() {
    if (!groups.length) { say("Rank an answer first; t then ties the next one with it."); return; }
    tieNext = true;
    say("Tie with " + groups[groups.length - 1].map(labelOf).join(" and ") + ": press an " +
      "answer's number (Backspace or Escape cancels).");
  }

  function ranking(choice) {
    digits = "";
    tieNext = false;
    if (choice === "submit") {
      const rest = unplaced();
      if (rest.length > 1) {
        say("Rank all answers first: " + rest.map(labelOf).join(", ") + " not ranked yet.", true);
        return;
      }
      submit(rest.length ? groups.concat([rest]) : groups, false);
    } else if (choice === "clear") { groups = []; showRanking(); say("Ranking cleared."); }
    else if (choice === "undo") { groups.pop(); showRanking(); say(""); }
    else if (choice === "s") skip();
  }

  const choose = kind === "pairwise" ? pairwise : ranking;
  task.querySelectorAll("button[data-choice]").forEach((b) => {
    b.addEventListener("click", () => choose(b.dataset.choice));
  });
  task.querySelectorAll("button[data-place], button[data-tie]").forEach((b) => {
    b.addEventListener("click", () => {
      const n = Number(b.dataset.place || b.dataset.tie);
      place(ids[n - 1], Boolean(b.dataset.tie));
    });
  });
  if (kind !== "pairwise") showRanking();

  // -- keys ----------------------------------------------------------------------------------
  // Typing in a field is never a shortcut; Enter on a button, link or disclosure does what
  // that control does (it never submits a ranking), and every shortcut can be turned off.
  const TEXT_FIELD = "textarea, select, [contenteditable], " +
    "input:not([type=radio]):not([type=checkbox])";
  const CONTROL = "button, a, summary, input, textarea, select, label, [contenteditable]";
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing) return;
    const k = ev.key.toLowerCase();
    const target = ev.target instanceof Element ? ev.target : document.body;
    if (k === "escape") {
      cancelTyping();
      if (target.closest("input, textarea, select")) target.blur();
      return;
    }
    if (target.closest(TEXT_FIELD) || !shortcutsOn) return;
    if (k !== "s") skipArmed = false;
    if (k === "enter") {
      if (kind !== "pairwise" && !target.closest(CONTROL)) {
        ev.preventDefault();
        ranking("submit");
      }
      return;
    }
    if (k === "s") askSkip();
    else if (kind === "pairwise") {
      if (!["1", "2", "t"].includes(k)) return;
      pairwise(k);
    } else if (/^[0-9]$/.test(k)) typeDigit(k);
    else if (k === "t") askTie();
    else if (k === "backspace") { if (!cancelTyping()) ranking("undo"); }
    else return;
    ev.preventDefault();
  });

  // -- drag (ranking only, by an answer's title, so answer text stays selectable) -------------
  // Dropping an answer onto a ranked one places it just before that one's group; onto an
  // unranked one, next in the ranking. Only the dragged answer is placed: no other answer is
  // ranked for the annotator (that would write the shown order into the data).
  let dragged = null;
  answers.forEach((a) => {
    const handle = a.querySelector(".handle");
    if (!handle) return;
    handle.addEventListener("dragstart", (ev) => {
      dragged = Number(a.dataset.id);
      ev.dataTransfer.setData("text/plain", labelOf(dragged));
    });
    handle.addEventListener("dragend", () => { dragged = null; });
    a.addEventListener("dragover", (ev) => { if (dragged !== null) ev.preventDefault(); });
    a.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const target = Number(a.dataset.id);
      if (dragged === null || target === dragged) return;
      const moved = dragged;
      groups = groups.map((g) => g.filter((id) => id !== moved)).filter((g) => g.length);
      const at = groups.findIndex((g) => g.includes(target));
      if (at < 0) groups.push([moved]); else groups.splice(at, 0, [moved]);
      showRanking();
      say(labelOf(moved) + " ranked " + ordinal(groups.findIndex((g) => g.includes(moved)) + 1) +
        ".");
    });
  });

  // -- the lease: renewed while the annotator is active, a warning before it runs out --------
  const RENEW_EVERY_MS = 2 * 60 * 1000;
  const WARN_BEFORE_MS = 2 * 60 * 1000;
  const lease = document.getElementById("lease");
  let deadline = Date.now() + Number(task.dataset.leaseSeconds) * 1000;
  let lastRenewal = Date.now();
  let active = false;  // any input since the last renewal
  ["keydown", "pointerdown", "pointermove", "wheel", "scroll", "input", "touchstart"]
    .forEach((type) => window.addEventListener(type, () => { active = true; },
      { capture: true, passive: true }));
  const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  function showLease(warning) {
    lease.textContent = warning || "Reserved for you until " + clock(deadline) + ".";
    lease.classList.toggle("error", Boolean(warning));
  }

  async function renew() {
    active = false;
    lastRenewal = Date.now();
    let answer;
    try {
      const resp = await fetch("/api/tasks/" + taskId + "/renew", {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
      if (resp.ok) {
        deadline = Date.now() + (await resp.json()).seconds_left * 1000;
        showLease();
        return;
      }
      answer = { status: resp.status, detail: "" };
      try { answer.detail = (await resp.json()).detail || ""; } catch (e) { /* not JSON */ }
    } catch (e) { return; }  // offline: tried again at the next check
    if (answer.status === 409) {
      showLease("The time for this task ran out and someone else took it.");
      say("The time for this task ran out and someone else took it.", true,
        { label: "Next task", run: () => window.location.reload() });
    } else if (answer.status === 404) {
      showLease("This task is no longer reserved for you: it was judged or skipped, " +
        "perhaps in another tab.");
      say("This task is no longer reserved for you: it was judged or skipped, perhaps in " +
        "another tab.", true, { label: "Next task", run: () => window.location.reload() });
    } else if (answer.status === 401) {
      showLease("Your session has ended, so this task is no longer kept for you.");
    }
  }

  function checkLease() {
    if (finished || busy) return;
    const left = deadline - Date.now();
    // Renewed every few minutes while the reader is active, and at once when the end is near
    // (a page opened late in its lease, after a reload or a new login).
    const due = Date.now() - lastRenewal >= RENEW_EVERY_MS || left <= WARN_BEFORE_MS;
    if (active && document.visibilityState === "visible" && due) {
      renew();
    } else if (left <= 0) {
      showLease("The time reserved for this task ran out at " + clock(deadline) + ". Someone " +
        "else may take it: submit now to try to keep it.");
    } else if (left <= WARN_BEFORE_MS) {
      showLease("This task is reserved for you only until " + clock(deadline) + ". Press a " +
        "key or move the mouse to keep it.");
    }
  }
  showLease();
  // Opening the page is activity: one opened near the end of its lease keeps it at once.
  if (deadline - Date.now() <= WARN_BEFORE_MS) renew();
  setInterval(checkLease, 20 * 1000);

  // -- a new task: at the top, its heading focused, the last action's outcome announced -------
  window.scrollTo(0, 0);
  document.getElementById("task-heading").focus();
  const flash = stored("sessionStorage", FLASH);
  if (flash) {
    stored("sessionStorage", FLASH, null);
    say(flash + " This is task " + taskId + ".");
  }
})();

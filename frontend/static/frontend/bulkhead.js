// Bulkhead UI: the live event feed (/ws/events/), live operation rows, and small form helpers.
// No framework beyond htmx; nothing is loaded from another host.
(function () {
  "use strict";

  var STATE_LABELS = {
    queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled"
  };

  function fire(name, detail) {
    document.body.dispatchEvent(new CustomEvent(name, { bubbles: true, detail: detail || {} }));
  }

  // --- live operations -------------------------------------------------------------------------

  function setText(root, field, text) {
    root.querySelectorAll('[data-field="' + field + '"]').forEach(function (el) { el.textContent = text; });
  }

  function updateOperation(el, event) {
    var state = String(event.state || el.dataset.state || "");
    var progress = Math.max(0, Math.min(100, parseInt(event.progress, 10) || 0));
    el.dataset.state = state;
    el.querySelectorAll('[data-field="state"]').forEach(function (badge) {
      badge.textContent = STATE_LABELS[state] || state;
      badge.className = badge.className.replace(/\bstate-\S+/g, "").trim() + " state-" + state;
    });
    el.querySelectorAll('[data-field="progressbar"]').forEach(function (bar) {
      bar.setAttribute("aria-valuenow", String(progress));
      bar.className = bar.className.replace(/\bstate-\S+/g, "").trim() + " state-" + state;
    });
    el.querySelectorAll('[data-field="progress"]').forEach(function (fill) { fill.style.width = progress + "%"; });
    setText(el, "percent", progress + "%");
    var message = state === "failed" && event.error ? event.error : event.message;
    if (message) { setText(el, "message", String(message).slice(0, 200)); }
  }

  function onOperation(event) {
    var id = String(event.id || "");
    var matches = id ? document.querySelectorAll('[data-operation-id="' + CSS.escape(id) + '"]') : [];
    matches.forEach(function (el) { updateOperation(el, event); });
    fire("bulkhead:operation", event);
    if (matches.length === 0) { fire("bulkhead:operation-new", event); }
  }

  // --- the event feed, with reconnect and capped exponential backoff ------------------------------

  var socket = null;
  var attempt = 0;
  var everConnected = false;

  function setLive(on) {
    var el = document.querySelector("[data-live-status]");
    if (!el) { return; }
    el.classList.toggle("on", on);
    var label = el.querySelector(".live-label");
    if (label) { label.textContent = on ? "live" : "reconnecting"; }
  }

  function connect(path) {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + window.location.host + path);
    socket.addEventListener("open", function () {
      setLive(true);
      if (everConnected) {
        // Events may have been missed while we were away: let pages refresh what they show.
        fire("bulkhead:event", { type: "reconnected" });
        fire("bulkhead:operation-new", { type: "reconnected" });
      }
      everConnected = true;
      attempt = 0;
    });
    socket.addEventListener("message", function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (!event || typeof event !== "object") { return; }
      if (event.type === "operation") { onOperation(event); } else { fire("bulkhead:event", event); }
    });
    socket.addEventListener("close", function (close) {
      setLive(false);
      socket = null;
      if (close.code === 4401) { return; }  // signed out: reconnecting would not help
      var delay = Math.min(30000, 1000 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
      attempt += 1;
      window.setTimeout(function () { connect(path); }, delay);
    });
  }

  // --- small helpers ---------------------------------------------------------------------------

  function copyFrom(button) {
    var target = document.querySelector(button.dataset.copyTarget);
    if (!target) { return; }
    var text = (target.value !== undefined ? target.value : target.textContent).trim();
    var done = function () {
      var before = button.textContent;
      button.textContent = "Copied";
      window.setTimeout(function () { button.textContent = before; }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(target); });
    } else {
      selectText(target);  // plain http: let the user press Ctrl+C
    }
  }

  function selectText(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  document.addEventListener("click", function (e) {
    var button = e.target.closest("[data-copy-target]");
    if (button) { e.preventDefault(); copyFrom(button); }
  });

  document.addEventListener("change", function (e) {
    var select = e.target.closest("select[data-autosubmit]");
    if (select && select.form) { select.form.requestSubmit(); }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var path = document.body.dataset.eventsPath;
    if (path && "WebSocket" in window) { connect(path); }
  });

  // --- phone width: the main menu folds behind a button -----------------------------------------

  document.addEventListener("click", function (event) {
    var toggle = event.target.closest ? event.target.closest("[data-menu-toggle]") : null;
    if (!toggle) { return; }
    var bar = toggle.closest(".topbar");
    var open = !bar.classList.contains("menu-open");
    bar.classList.toggle("menu-open", open);
    toggle.setAttribute("aria-expanded", String(open));
  });

  // --- uploads: bytes sent as they go (htmx reports the browser's upload progress) ---------------

  function humanBytes(n) {
    var units = ["B", "KiB", "MiB", "GiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  document.addEventListener("htmx:xhr:progress", function (event) {
    var form = event.target.closest ? event.target.closest("form") : null;
    var box = form ? form.querySelector("[data-upload-progress]") : null;
    if (!box || !event.detail || !event.detail.lengthComputable) { return; }
    var loaded = event.detail.loaded, total = event.detail.total || 1;
    box.hidden = false;
    box.querySelector("progress").value = Math.round(100 * loaded / total);
    box.querySelector("[data-upload-text]").textContent =
      humanBytes(loaded) + " of " + humanBytes(total) + " sent" + (loaded >= total ? "; importing…" : "");
  });
})();

// Bulkhead UI: a workload's live output or serial console in xterm.js, over /ws/workloads/<id>/console/.
// Each connection spends a single-use token: the page brings the first, a POST fetches the next ones.
(function () {
  "use strict";

  var MAX_DELAY = 30000;
  var REASONS = {
    4401: "signed out",
    4403: "not allowed (the console link expired: reconnecting)",
    4404: "this workload is gone or not yours"
  };

  function csrfToken() {
    try {
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || "";
    } catch (e) {
      return "";
    }
  }

  function freshToken(url) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(), "Accept": "application/json" }
    }).then(function (response) {
      if (!response.ok) { throw new Error("status " + response.status); }
      return response.json();
    }).then(function (body) { return String(body.token || ""); });
  }

  function attach(el) {
    var status = el.closest(".card").querySelector("[data-console-status]");
    var term = new window.Terminal({
      convertEol: true,
      cursorBlink: false,
      disableStdin: true,
      fontSize: 13,
      rows: 24,
      scrollback: 5000
    });
    var fit = window.FitAddon ? new window.FitAddon.FitAddon() : null;
    if (fit) { term.loadAddon(fit); }
    term.open(el);
    if (fit) {
      fit.fit();
      window.addEventListener("resize", function () { fit.fit(); });
    }

    var token = el.dataset.consoleToken || "";
    var socket = null;
    var attempt = 0;
    var stopped = false;

    function say(text) { if (status) { status.textContent = text; } }

    term.onData(function (data) {
      // Only a micro-VM's serial console takes input (the server says so in its hello).
      if (socket && socket.readyState === WebSocket.OPEN && !term.options.disableStdin) {
        socket.send(new TextEncoder().encode(data));
      }
    });

    function retry() {
      if (stopped) { return; }
      var delay = Math.min(MAX_DELAY, 1000 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
      attempt += 1;
      window.setTimeout(start, delay);
    }

    function start() {
      var ready = token ? Promise.resolve(token) : freshToken(el.dataset.consoleTokenUrl);
      token = "";  // spent by this attempt, whatever happens
      ready.then(open, function () {
        say("cannot get a console link; retrying");
        retry();
      });
    }

    function open(secret) {
      var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
      var url = scheme + "//" + window.location.host + el.dataset.consolePath + "?token=" + encodeURIComponent(secret);
      socket = new WebSocket(url);
      socket.binaryType = "arraybuffer";
      say("connecting…");
      socket.addEventListener("open", function () {
        attempt = 0;
        say("live");
      });
      socket.addEventListener("message", function (message) {
        if (typeof message.data === "string") {
          var notice;
          try { notice = JSON.parse(message.data); } catch (e) { return; }
          if (notice.type === "hello") {
            var interactive = notice.mode === "console";
            if (!interactive) { term.reset(); }  // the server replays the recent output on each connect
            term.options.disableStdin = !interactive;
            term.options.convertEol = !interactive;
            say(interactive ? "live: serial console" : "live: output (read-only)");
          } else if (notice.type === "notice" && notice.message) {
            term.write("\r\n\x1b[2m[" + String(notice.message) + "]\x1b[0m\r\n");
          }
          return;
        }
        term.write(new Uint8Array(message.data));
      });
      socket.addEventListener("close", function (close) {
        socket = null;
        if (close.code === 4401 || close.code === 4404) {
          stopped = true;
          say("closed: " + REASONS[close.code]);
          return;
        }
        say("disconnected; reconnecting");
        retry();
      });
    }

    start();
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!window.Terminal || !("WebSocket" in window)) { return; }
    document.querySelectorAll("[data-console]").forEach(attach);
  });
})();

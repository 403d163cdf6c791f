// The session page's socket glue: on every (re)connect, tell the server the
// last event this page shows so it sends exactly what is missing; show the
// connection state; stop for good on an auth refusal.
(function () {
  "use strict";

  var REFUSALS = {
    4401: "Logged out. Log in again and reload the page.",
    4403: "Access refused for this session.",
    4404: "No such session.",
    4429: "Too many messages from this page; reload it to reconnect.",
  };

  function lastSeq() {
    var rows = document.querySelectorAll("#transcript > [data-seq]");
    return rows.length ? Number(rows[rows.length - 1].getAttribute("data-seq")) : 0;
  }

  // The last event shown goes in the socket's URL (?after=N), afresh on every
  // (re)connect: the server sends what is missing as soon as it accepts the
  // socket, with no round trip for a hello. (The hello is still said, for a
  // URL that went without it; after the URL's, it changes nothing.)
  if (window.htmx && htmx.createWebSocket) {
    var createWebSocket = htmx.createWebSocket;
    htmx.createWebSocket = function (url) {
      var el = document.getElementById("session-socket");
      var path = el && el.getAttribute("ws-connect");
      if (path && document.getElementById("transcript") && url.slice(-path.length) === path) {
        url += "?after=" + lastSeq();
      }
      return createWebSocket(url);
    };
  }

  function setState(state, text) {
    var el = document.getElementById("connection");
    if (!el) return;
    el.setAttribute("data-state", state);
    el.textContent = text;
  }

  document.addEventListener("htmx:wsConnecting", function () {
    setState("connecting", "connecting…");
  });
  // A heartbeat through proxies that close idle sockets; the server's pong is not HTML.
  var socket = null;
  setInterval(function () {
    if (socket && document.getElementById("transcript")) socket.send(JSON.stringify({ type: "ping" }));
  }, 25000);
  document.addEventListener("htmx:wsBeforeMessage", function (evt) {
    if (typeof evt.detail.message === "string" && evt.detail.message.indexOf('{"type": "pong"') === 0) evt.preventDefault();
  });
  document.addEventListener("htmx:wsClose", function () {
    socket = null;
  });

  document.addEventListener("htmx:wsOpen", function (evt) {
    socket = evt.detail.socketWrapper;
    setState("live", "live");
    if (!document.getElementById("transcript")) return; // the session list's socket only listens
    evt.detail.socketWrapper.send(JSON.stringify({ type: "hello", after: lastSeq() }));
  });
  document.addEventListener("htmx:wsClose", function (evt) {
    var code = evt.detail.event && evt.detail.event.code;
    if (REFUSALS[code]) {
      setState("refused", REFUSALS[code]);
    } else {
      setState("reconnecting", "reconnecting…");
    }
  });
  document.addEventListener("htmx:wsError", function () {
    setState("reconnecting", "reconnecting…");
  });

  // The transcript scrolls on its own: it opens at the newest event, follows
  // new ones while the reader is at the bottom, and keeps the reader's place
  // when older events are loaded above.
  function transcript() {
    return document.getElementById("transcript");
  }
  var following = true;
  var fromBottom = null;

  function toBottom(t) {
    t.scrollTop = t.scrollHeight;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var t = transcript();
    if (!t) return;
    toBottom(t);
    t.addEventListener("scroll", function () {
      following = t.scrollHeight - t.scrollTop - t.clientHeight < 80;
    });
    new MutationObserver(function () {
      if (fromBottom !== null) {
        t.scrollTop = t.scrollHeight - fromBottom; // older events went in above: stay put
        fromBottom = null;
      } else if (following) {
        toBottom(t);
      }
    }).observe(t, { childList: true });
  });
  document.addEventListener("htmx:beforeSwap", function (evt) {
    var t = transcript();
    if (t && evt.detail.target && evt.detail.target.id === "older-events") {
      fromBottom = t.scrollHeight - t.scrollTop;
    }
  });

  // A control's refusal stays until the next control is pressed: that one's answer replaces it, or, if
  // it is accepted (204, nothing to swap), nothing does.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var errors = document.getElementById("action-errors");
    if (errors && evt.detail.target === errors) {
      errors.replaceChildren();
    }
  });

  // Elapsed time of a live run ticks on between pushes.
  function pad(n) {
    return n < 10 ? "0" + n : String(n);
  }
  setInterval(function () {
    var now = Date.now() / 1000;
    document.querySelectorAll("time.elapsed[data-started]:not([data-ended])").forEach(function (el) {
      var s = Math.max(0, Math.floor(now - Number(el.getAttribute("data-started"))));
      var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
      el.textContent = (h ? h + ":" + pad(m) : String(m)) + ":" + pad(s % 60);
    });
  }, 1000);
})();

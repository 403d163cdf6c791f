// The session page's socket glue: on every (re)connect, tell the server the
// last event this page shows so it sends exactly what is missing; show the
// connection state; stop for good on an auth refusal.
(function () {
  "use strict";

  var REFUSALS = {
    4401: "Logged out. Log in again and reload the page.",
    4403: "Access refused for this session.",
    4404: "No such session.",
  };

  function lastSeq() {
    var rows = document.querySelectorAll("#transcript > [data-seq]");
    return rows.length ? Number(rows[rows.length - 1].getAttribute("data-seq")) : 0;
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
  document.addEventListener("htmx:wsOpen", function (evt) {
    setState("live", "live");
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
})();

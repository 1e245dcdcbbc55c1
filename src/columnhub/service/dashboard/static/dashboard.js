// columnhub dashboard: polls GET /api/v1/overview every second and redraws the page.
// No framework, no build step. Only textContent is set (titles cannot inject markup).
(function () {
  "use strict";
  var POLL_MS = 1000;
  var STATES = ["queued", "running", "complete", "failed", "cancelled"];

  function $(id) { return document.getElementById(id); }
  function int(n) { return (typeof n === "number") ? Math.round(n).toLocaleString("en-US") : "-"; }
  function bytes(n) {
    if (typeof n !== "number") { return "-"; }
    var units = ["B", "kB", "MB", "GB", "TB"], i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }
  function ratio(r) { return (typeof r === "number") ? (100 * r).toFixed(1) + " %" : "-"; }
  function cell(tr, cls, text) {
    var td = document.createElement("td");
    td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  function token() { return window.sessionStorage.getItem("columnhub-token") || ""; }

  function requestRow(r) {
    var p = r.progress || {};
    var done = p.parts_done || 0, total = p.parts_total || 0;
    var tr = document.createElement("tr");
    tr.dataset.requestId = r.id;
    tr.dataset.status = r.status;
    cell(tr, "id", String(r.id).slice(0, 12)).title = r.id;
    cell(tr, "title", r.title || "");
    cell(tr, "status", r.status);
    var td = cell(tr, "progress", "");
    var bar = document.createElement("progress");
    bar.max = Math.max(total, 1);
    bar.value = done;
    var span = document.createElement("span");
    span.className = "parts";
    span.textContent = done + "/" + total;
    td.appendChild(bar);
    td.appendChild(document.createTextNode(" "));
    td.appendChild(span);
    cell(tr, "events num", int(p.events || 0));
    cell(tr, "rate num", int(p.rate_events_per_s || 0));
    cell(tr, "cache-hits num", int(p.cache_hits || 0));
    cell(tr, "created", r.created_at || "");
    if (r.error) { tr.title = r.error.type + ": " + r.error.message; }
    return tr;
  }

  function draw(d) {
    STATES.forEach(function (s) {
      var el = document.querySelector('.count[data-state="' + s + '"]');
      if (el) { el.textContent = int((d.counts || {})[s] || 0); }
    });
    var t = d.throughput || {}, c = d.cache || {};
    $("events-per-s").textContent = int(t.events_per_s);
    $("events-delivered").textContent = int(t.events_delivered);
    $("parts-done").textContent = int(t.parts_done);
    $("bytes-written").textContent = bytes(t.bytes_written);
    $("hit-ratio").textContent = ratio(c.hit_ratio);
    $("cache-hits").textContent = int(c.hits);
    $("cache-misses").textContent = int(c.misses);
    $("cache-bytes").textContent = bytes(c.bytes);
    $("user").textContent = d.user || "";

    var rows = $("request-rows");
    rows.replaceChildren.apply(rows, (d.requests || []).map(requestRow));

    var w = d.workers || {};
    $("scheduler").textContent = w.scheduler
      ? "scheduler " + w.scheduler + (w.error ? " (unreachable: " + w.error + ")" : "")
      : "executor: " + (w.mode || "threads") + " in the service";
    $("worker-rows").replaceChildren.apply($("worker-rows"), (w.workers || []).map(function (x) {
      var tr = document.createElement("tr");
      cell(tr, "name", x.name);
      cell(tr, "num", int(x.nthreads));
      cell(tr, "num", int(x.executing));
      cell(tr, "num", bytes(x.memory) + " / " + bytes(x.memory_limit));
      return tr;
    }));

    var inf = d.inference || {};
    $("inference-rows").replaceChildren.apply($("inference-rows"), (inf.servers || []).map(function (s) {
      var tr = document.createElement("tr");
      tr.className = s.up ? "up" : "down";
      cell(tr, "model", s.model + "@" + s.version);
      cell(tr, "server", s.protocol + "://" + s.server);
      cell(tr, "health", s.up ? "up" : "down").title = s.error || "";
      return tr;
    }));
    var models = inf.models || {};
    $("inference-rate").textContent = Object.keys(models).map(function (m) {
      return m + ": " + int(models[m].rows_per_s) + " rows/s";
    }).join(", ") || ((inf.servers || []).length ? "" : "no remote model configured");
    $("updated").textContent = "updated " + (d.generated_at || "");
  }

  function poll() {
    var headers = { "Accept": "application/json" };
    if (token()) { headers.Authorization = "Bearer " + token(); }
    fetch("/api/v1/overview", { headers: headers, cache: "no-store" })
      .then(function (resp) {
        return resp.json().then(function (body) { return { status: resp.status, body: body }; });
      })
      .then(function (r) {
        if (r.status === 200) {
          $("error").hidden = true;
          $("login").hidden = true;
          draw(r.body);
        } else {
          var e = (r.body && r.body.error) || {};
          $("error").textContent = (e.type || r.status) + ": " + (e.message || "");
          $("error").hidden = false;
          if (r.status === 401 || r.status === 403) { $("login").hidden = false; }
        }
      })
      .catch(function (err) {
        $("error").textContent = "service unreachable: " + err;
        $("error").hidden = false;
      })
      .finally(function () { window.setTimeout(poll, POLL_MS); });
  }

  $("login").addEventListener("submit", function (ev) {
    ev.preventDefault();
    window.sessionStorage.setItem("columnhub-token", $("token").value.trim());
    $("token").value = "";
  });
  var initial = $("initial").textContent;
  if (initial) { draw(JSON.parse(initial)); }
  poll();
})();

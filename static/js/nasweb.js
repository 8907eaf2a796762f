/* nasweb front end: websocket progress with reconnection, and Plotly charts fed by JSON endpoints.
   Pages carry data-* attributes; nothing is inlined in <script> tags. */
(function () {
  "use strict";

  function wsUrl(path) {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + window.location.host + path;
  }

  /* A websocket to one job's group that reconnects with backoff until the job is finished. */
  function jobSocket(kind, id, onMessage) {
    var delay = 500, closedForGood = false, socket = null;
    function open() {
      socket = new WebSocket(wsUrl("/ws/jobs/" + kind + "/" + id + "/"));
      socket.onopen = function () {
        delay = 500;
        /* Tests and users can see that live updates are connected. */
        var root = document.documentElement;
        root.dataset.liveSockets = String(Number(root.dataset.liveSockets || 0) + 1);
      };
      socket.onmessage = function (event) {
        var message = JSON.parse(event.data);
        onMessage(message);
        if (message.type === "status" && ["succeeded", "failed", "cancelled"].indexOf(message.status) >= 0) {
          closedForGood = true;
          socket.close();
        }
      };
      socket.onclose = function (event) {
        if (closedForGood || event.code === 4403 || event.code === 4404) return;
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 10000);
      };
    }
    open();
    return { close: function () { closedForGood = true; if (socket) socket.close(); } };
  }

  function fetchJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  /* <div class="progress" data-job-kind data-job-id data-status-url [data-reload-on-finish]> */
  function setupProgress(element) {
    var bar = element.querySelector(".bar"), label = element.querySelector(".label");
    function show(fraction, text, status) {
      bar.style.width = Math.round(Math.max(0, Math.min(1, fraction)) * 100) + "%";
      if (text) label.textContent = text;
      if (status) element.dataset.status = status;
    }
    function finished(status) {
      return ["succeeded", "failed", "cancelled"].indexOf(status) >= 0;
    }
    fetchJson(element.dataset.statusUrl).then(function (job) {
      show(job.progress, job.message || job.status, job.status);
      if (finished(job.status)) return;
      jobSocket(element.dataset.jobKind, element.dataset.jobId, function (message) {
        if (message.type === "progress" && message.total) {
          show(message.current / message.total, message.message || (message.current + " / " + message.total));
        } else if (message.type === "status") {
          show(message.status === "succeeded" ? 1 : message.progress || 0, message.error || message.status, message.status);
          if (finished(message.status) && element.hasAttribute("data-reload-on-finish")) {
            setTimeout(function () { window.location.reload(); }, 1500);
          }
        }
      });
    }).catch(function (error) { label.textContent = String(error); });
  }

  var layout = function (title, xTitle, yTitle, extra) {
    var base = {
      title: { text: title, font: { size: 15 } }, margin: { t: 40, r: 20, b: 50, l: 60 },
      xaxis: { title: { text: xTitle } }, yaxis: { title: { text: yTitle } },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fff", legend: { orientation: "h", y: -0.2 },
    };
    /* A chart names only what it changes: the base's margin and axes are merged one level deep
       (a range or a wider right margin keeps the axis title and the other margins). */
    Object.keys(extra || {}).forEach(function (key) {
      var value = extra[key], own = base[key];
      var nested = own && value && typeof own === "object" && typeof value === "object" && !Array.isArray(value);
      base[key] = nested ? Object.assign({}, own, value) : value;
    });
    return base;
  };

  var charts = {
    /* Per-layer LUT entries (bars, sorted) and predicted-vs-measured scatter. */
    lut: function (element, data) {
      var traces = [];
      Object.keys(data.layers).sort().forEach(function (op) {
        var rows = data.layers[op].slice().sort(function (a, b) { return a.ms - b.ms; });
        traces.push({ type: "bar", name: op + " (" + rows.length + ")", x: rows.map(function (r) { return r.key; }),
                      y: rows.map(function (r) { return r.ms; }), hovertemplate: "%{x}<br>%{y:.4f} ms<extra></extra>" });
      });
      Plotly.newPlot(element, traces, layout("Latency of every layer in the table", "layer key", "ms",
        { xaxis: { showticklabels: false, title: { text: "layer (hover for key)" } } }), { responsive: true });
    },
    accuracy: function (element, data) {
      if (!data.samples.length) { element.textContent = "No end-to-end measurements in this table."; return; }
      var xs = data.samples.map(function (s) { return s.measured_ms; });
      var ys = data.samples.map(function (s) { return s.predicted_ms; });
      var lo = Math.min.apply(null, xs.concat(ys)), hi = Math.max.apply(null, xs.concat(ys));
      Plotly.newPlot(element, [
        { type: "scatter", mode: "markers", name: "sub-nets", x: xs, y: ys },
        { type: "scatter", mode: "lines", name: "predicted = measured", x: [lo, hi], y: [lo, hi], line: { dash: "dot" } },
        { type: "scatter", mode: "lines", name: "±10 %", x: [lo, hi, null, lo, hi], y: [lo * 1.1, hi * 1.1, null, lo * 0.9, hi * 0.9],
          line: { dash: "dash", width: 1, color: "#999" } },
      ], layout("LUT prediction vs end-to-end measurement", "measured ms", "predicted ms"), { responsive: true });
    },
  };

  /* Meta-training curves: loss and accuracy per iteration; live events extend the traces in place. */
  charts.training = function (element, data) {
    var h = data.history || [];
    var pick = function (key) { return h.map(function (p) { return p[key]; }); };
    Plotly.newPlot(element, [
      { type: "scatter", mode: "lines", name: "query loss", x: pick("current"), y: pick("loss") },
      { type: "scatter", mode: "lines", name: "query accuracy", x: pick("current"), y: pick("accuracy"), yaxis: "y2" },
    ], layout("Meta-training", "iteration", "loss", { yaxis2: { title: { text: "accuracy" }, overlaying: "y", side: "right", range: [0, 1],
              tickmode: "linear", tick0: 0, dtick: 0.2, tickformat: ".0%", showgrid: false },
              margin: { r: 70 } }),  // room for the accuracy axis' ticks and title
    { responsive: true });
    return function (message) {
      if (message.type !== "progress" || message.kind !== "meta_train") return;
      Plotly.extendTraces(element, { x: [[message.current], [message.current]], y: [[message.loss], [message.accuracy]] }, [0, 1]);
      var eta = document.getElementById("eta");
      if (eta && message.eta_s != null) {
        eta.textContent = "iteration " + message.current + " / " + message.total + " · " +
          (message.it_per_s ? message.it_per_s.toFixed(2) + " it/s · " : "") + "ETA " + Math.round(message.eta_s) + " s";
      }
    };
  };

  /* A cost as the run pages write it: grouped whole numbers, latency to 4 significant digits. */
  function formatCost(value, constraint) {
    if (constraint === "latency_ms") return Number(value.toPrecision(4)) + " ms";
    return Math.round(value).toLocaleString("en-US") + ({ params: " params", macs: " MACs" }[constraint] || "");
  }

  /* What a search minimised (adaption_payload's search_metric): its fitness, front and chosen
     points are mean query losses, or query error rates. */
  var SEARCH_METRICS = {
    loss: { short: "loss", axis: "mean query loss (lower is better)" },
    accuracy: { short: "error rate", axis: "query error rate (lower is better)" },
  };
  function searchMetric(name) { return SEARCH_METRICS[name] || SEARCH_METRICS.loss; }

  function costOf(point, constraint) {
    var costs = point.costs || point;
    return costs[constraint];
  }

  /* The live Pareto chart: each generation's population, the current front, budget lines, the
     chosen models and the MAML/MAML++ reference points. */
  charts.pareto = function (element, data) {
    var constraint = data.constraint;
    var population = { type: "scatter", mode: "markers", name: "population (this generation)", x: [], y: [],
                       marker: { size: 6, opacity: 0.55, color: "#94a3b8" } };
    var front = { type: "scatter", mode: "lines+markers", name: "Pareto front", x: [], y: [], line: { shape: "hv", color: "#2563eb" } };
    function setGeneration(point) {
      population.x = (point.population || []).map(function (p) { return costOf(p, constraint); });
      population.y = (point.population || []).map(function (p) { return p.fitness; });
      var f = (point.front || []).slice().sort(function (a, b) { return costOf(a, constraint) - costOf(b, constraint); });
      front.x = f.map(function (p) { return costOf(p, constraint); });
      front.y = f.map(function (p) { return p.fitness != null ? p.fitness : p.loss; });
    }
    var history = data.history || [];
    if (history.length) setGeneration(history[history.length - 1]);
    if (data.front && data.front.length) {
      var final = data.front.slice().sort(function (a, b) { return costOf(a, constraint) - costOf(b, constraint); });
      front.x = final.map(function (p) { return costOf(p, constraint); });
      front.y = final.map(function (p) { return p.loss != null ? p.loss : p.fitness; });
    }
    var shapes = (data.budgets || []).map(function (b) {
      return { type: "line", xref: "x", yref: "paper", x0: b, x1: b, y0: 0, y1: 1, line: { dash: "dash", color: "#b91c1c", width: 1 } };
    });
    var chosen = { type: "scatter", mode: "markers", name: "chosen per budget", marker: { size: 13, symbol: "star", color: "#15803d" },
                   x: (data.outcomes || []).map(function (o) { return costOf(o.costs || {}, constraint); }),
                   y: (data.outcomes || []).map(function (o) { return o.search_loss; }) };
    /* The search's own extent sets the x range: every candidate fits a budget, so the largest
       budget bounds the population for the whole run. A reference net far beyond it (MAML++ has
       ~40x the parameters of a small budget) would otherwise squeeze the search into a sliver. */
    var extent = [].concat(population.x, front.x, chosen.x, data.budgets || []).filter(function (x) {
      return typeof x === "number" && isFinite(x);
    });
    var xMax = extent.length ? 1.08 * Math.max.apply(null, extent) : null;
    /* MAML / MAML++ have a cost but no search loss: drawn as labelled vertical lines at their cost,
       or, beyond the range, named at its right edge with their cost. */
    var annotations = [];
    (data.baselines || []).forEach(function (b, i) {
      var x = costOf(b.costs || b, constraint);
      if (x == null) return;
      var acc = b.accuracy && b.accuracy.mean != null ? " " + (100 * b.accuracy.mean).toFixed(1) + " %" : "";
      var label = { xref: "x", yref: "paper", y: 1 - 0.07 * i, showarrow: false, font: { color: "#7c3aed", size: 11 } };
      if (xMax != null && x > xMax) {
        annotations.push(Object.assign(label, { x: xMax, xanchor: "right", text: b.name + acc + " at " + formatCost(x, constraint) + " →" }));
        return;
      }
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: x, x1: x, y0: 0, y1: 1, line: { dash: "dot", color: "#7c3aed", width: 1 } });
      annotations.push(Object.assign(label, { x: x, xanchor: "left", text: b.name + acc }));
    });
    var extra = { shapes: shapes, annotations: annotations };
    if (xMax != null) extra.xaxis = { range: [0, xMax] };
    var traces = [population, front, chosen];
    var metric = data.search_metric;
    function titles(name) {
      return { title: "Search: " + constraint + " vs few-shot " + searchMetric(name).short + " on " + data.device,
               yTitle: searchMetric(name).axis };
    }
    var named = titles(metric);
    Plotly.newPlot(element, traces, layout(named.title, constraint, named.yTitle, extra), { responsive: true });
    element.dataset.metric = searchMetric(metric).short;
    element.dataset.generations = String(history.length);
    return function (message) {
      if (message.type !== "progress" || message.kind !== "adapt") return;
      setGeneration(message);
      /* A queued run's metric was its preset's; the worker's events say what it really searches on. */
      if (message.metric && message.metric !== metric) {
        metric = message.metric;
        named = titles(metric);
        Plotly.relayout(element, { "title.text": named.title, "yaxis.title.text": named.yTitle });
        element.dataset.metric = searchMetric(metric).short;
      }
      Plotly.restyle(element, { x: [population.x, front.x], y: [population.y, front.y] }, [0, 1]);
      element.dataset.generations = String(Number(element.dataset.generations || 0) + 1);
    };
  };

  charts.compare = function (element, data) {
    /* Fronts under a params or MACs budget do not depend on the device, so two of them can coincide:
       a dash, a marker symbol and a wider line for the ones drawn first keep them visible underneath. */
    var dashes = ["solid", "dash", "dot", "dashdot"], symbols = ["circle", "square", "diamond", "triangle-up"];
    function distinct(values) { return values.filter(function (v, i, all) { return all.indexOf(v) === i; }); }
    /* A loss and an error rate share no scale: when runs searched on both, the error-rate fronts
       get their own y-axis on the right, and every legend entry says which it is. */
    var metrics = distinct(data.series.map(function (s) { return s.metric || "loss"; }));
    var mixed = metrics.length > 1;
    var traces = data.series.map(function (s, i) {
      var f = s.front.slice().sort(function (a, b) { return costOf(a, s.constraint) - costOf(b, s.constraint); });
      var metric = s.metric || "loss";
      var trace = { type: "scatter", mode: "lines+markers", line: { shape: "hv", dash: dashes[i % 4], width: Math.min(8, 2 + 2 * (data.series.length - 1 - i)) },
                    marker: { symbol: symbols[i % 4], size: 7 },
                    name: s.device + " (" + s.constraint + ", run " + s.run + (mixed ? ", " + searchMetric(metric).short : "") + ")",
                    x: f.map(function (p) { return costOf(p, s.constraint); }), y: f.map(function (p) { return p.loss != null ? p.loss : p.fitness; }) };
      if (mixed && metric === "accuracy") trace.yaxis = "y2";
      return trace;
    });
    if (!traces.length) { element.textContent = "No finished adaption of this super-net yet."; return; }
    // Fronts of different budget kinds (latency vs params) share no unit; name it when they agree.
    var kinds = distinct(data.series.map(function (s) { return s.constraint; }));
    var xTitle = kinds.length === 1 ? kinds[0] : "cost (" + kinds.join(" / ") + ")";
    var extra = mixed ? { yaxis2: { title: { text: searchMetric("accuracy").axis }, overlaying: "y", side: "right" }, margin: { r: 70 } } : undefined;
    Plotly.newPlot(element, traces, layout("Pareto fronts of one super-net on several devices", xTitle,
                   searchMetric(mixed ? "loss" : metrics[0]).axis, extra), { responsive: true });
  };

  function setupChart(element) {
    var draw = charts[element.dataset.chart];
    if (!draw) return;
    fetchJson(element.dataset.url).then(function (data) {
      var onMessage = draw(element, data);
      var live = onMessage && element.dataset.jobId && ["succeeded", "failed", "cancelled"].indexOf(data.status) < 0;
      if (live) jobSocket(element.dataset.jobKind, element.dataset.jobId, onMessage);
    }).catch(function (error) { element.textContent = String(error); });
  }

  window.NasWeb = { jobSocket: jobSocket, fetchJson: fetchJson, layout: layout, charts: charts };

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".progress[data-job-id]").forEach(setupProgress);
    document.querySelectorAll("[data-chart]").forEach(setupChart);
  });
})();

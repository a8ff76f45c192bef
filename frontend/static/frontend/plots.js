// Usage plots: every [data-plots] block fetches its object's history from the API and draws one uPlot
// chart per [data-plot] inside it; range buttons switch hour/day/week/month; redrawn every step.
(function () {
  "use strict";

  var UNITS = {
    cores: function (v) { return v == null ? "" : v.toFixed(2); },
    bytes: function (v) {
      if (v == null) { return ""; }
      var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return v.toFixed(v < 10 && i > 0 ? 1 : 0) + " " + units[i];
    },
    rate: function (v) { return v == null ? "" : UNITS.bytes(v) + "/s"; },
    count: function (v) { return v == null ? "" : String(Math.round(v)); }
  };
  var COLOURS = ["#2f6fde", "#d9480f", "#2b8a3e", "#7048e8"];

  function draw(plot, history) {
    var sources = plot.dataset.plotSources.split(",");
    var unit = UNITS[plot.dataset.plotUnit] || UNITS.count;
    var data = [history.times];
    var series = [{}];
    sources.forEach(function (source, i) {
      data.push(history.values[source] || []);
      series.push({
        label: plot.dataset.plotLabels ? plot.dataset.plotLabels.split(",")[i] : source,
        stroke: COLOURS[i % COLOURS.length],
        width: 1.5,
        value: function (_u, v) { return unit(v); }
      });
    });
    var width = Math.max(240, plot.clientWidth || 320);
    if (plot._uplot) {
      plot._uplot.setData(data);
      return;
    }
    plot._uplot = new window.uPlot({
      width: width,
      height: 150,
      series: series,
      axes: [{}, { values: function (_u, ticks) { return ticks.map(unit); }, size: 70 }],
      legend: { live: true }
    }, data, plot);
  }

  function load(block) {
    var range = block.dataset.range || "hour";
    var url = block.dataset.historyUrl + "?range=" + encodeURIComponent(range);
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (history) {
        if (!history) { return; }
        block.querySelectorAll("[data-plot]").forEach(function (plot) { draw(plot, history); });
        block.dataset.loaded = String(history.times.length);
        clearTimeout(block._timer);
        block._timer = setTimeout(function () { load(block); }, Math.max(5, history.step) * 1000);
      })
      .catch(function () {
        block._timer = setTimeout(function () { load(block); }, 30000);
      });
  }

  function start(root) {
    root.querySelectorAll("[data-plots]").forEach(function (block) {
      if (block._started) { return; }
      block._started = true;
      block.querySelectorAll("[data-range]").forEach(function (button) {
        button.addEventListener("click", function () {
          block.dataset.range = button.dataset.range;
          block.querySelectorAll("[data-range]").forEach(function (b) {
            b.setAttribute("aria-pressed", String(b === button));
          });
          block.querySelectorAll("[data-plot]").forEach(function (plot) {
            if (plot._uplot) { plot._uplot.destroy(); plot._uplot = null; }
          });
          load(block);
        });
      });
      load(block);
    });
  }

  document.addEventListener("DOMContentLoaded", function () { start(document); });
  document.addEventListener("htmx:afterSwap", function (event) { start(event.target); });
})();

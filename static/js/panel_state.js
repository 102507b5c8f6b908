// The steering panel's configuration in its URL: as the user edits, the steering form's fields are written
// into the query string (history.replaceState, no new history entry), so a reload or a copied link reopens
// the same configuration. The panel view reads them back (steering_app/panel.py, QUERY_FIELDS); the page is
// left alone until the user changes something, so ?run= and ?preset= links stay as they were opened.
(function () {
  "use strict";

  // Fields of the form that are not the configuration: the CSRF token, the feature search box and the
  // presets section's own inputs.
  const SKIP = new Set(["csrfmiddlewaretoken", "q", "preset_name", "preset_description", "preset_ids", "preset_file"]);
  // Ticked or not, a box is written as 1 or 0: a missing value means "as the run or preset had it".
  const FLAGS = ["chat", "private"];
  // The run or preset the page was opened from stays named (the panel shows the preset's name).
  const ORIGINS = ["run", "preset"];
  // A very long prompt stays out of the URL: servers refuse request lines much longer than this.
  const MAX_PROMPT_IN_URL = 4000;
  const DELAY_MS = 150;
  let timer = null;

  function form() {
    return document.getElementById("steering-form");
  }

  function stateQuery(f) {
    const current = new URLSearchParams(window.location.search);
    const params = new URLSearchParams();
    ORIGINS.forEach(function (name) {
      if (current.has(name)) params.set(name, current.get(name));
    });
    new FormData(f).forEach(function (value, name) {
      if (typeof value !== "string" || SKIP.has(name) || FLAGS.indexOf(name) >= 0) return;
      params.append(name, value);
    });
    FLAGS.forEach(function (name) {
      const box = f.querySelector('input[type="checkbox"][name="' + name + '"]');
      if (box) params.set(name, box.checked ? "1" : "0");
    });
    if (encodeURIComponent(params.get("prompt") || "").length > MAX_PROMPT_IN_URL) params.delete("prompt");
    return params.toString();
  }

  function record() {
    const f = form();
    if (!f) return;
    const url = window.location.pathname + "?" + stateQuery(f) + window.location.hash;
    if (url !== window.location.pathname + window.location.search + window.location.hash) {
      window.history.replaceState(window.history.state, "", url);
    }
  }

  // After the other listeners of the same event (steering.js sets sliders and layers on click).
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(record, DELAY_MS);
  }

  function isConfiguration(element) {
    return !!element && !!element.closest && !!element.closest("#steering-form") && !SKIP.has(element.name || "");
  }

  document.addEventListener("input", function (event) {
    if (isConfiguration(event.target)) schedule();
  });
  document.addEventListener("change", function (event) {
    if (isConfiguration(event.target)) schedule();
  });
  // Capturing: steering.js's own click handler may remove the button (a feature card's ×) from the form.
  document.addEventListener(
    "click",
    function (event) {
      const button = event.target.closest && event.target.closest("#steering-form button[type=button]");
      if (button && !button.closest("#presets-section")) schedule();
    },
    true
  );
  // A feature card added by the search results' "+ Add", or the layer grid the method re-rendered (multiplicative
  // disables, and so stops sending, the layers other than the SAE's).
  const SWAPPED = ["selected-features", "layers"];
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && SWAPPED.indexOf(event.detail.target.id) >= 0) schedule();
  });
})();

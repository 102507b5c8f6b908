// Coefficients on the steering panel: a number box beside every slider, the two kept in step; the slider's
// range and scale follow a typed value; the training's limit is said before the server refuses; a panel
// whose coefficients are all 0 says that its run is a control run; and the Sweep box enables the sweep's
// multipliers of every coefficient (this file alone sets their input's disabled). The slider
// (name="coefficient") is what the form submits.
(function () {
  "use strict";

  const BASE_RANGE = 5; // the mock's ±5, or ±2‖h‖ once steering.js has measured an uncalibrated training
  const DRAG_STEP = 0.1;

  function form() {
    return document.getElementById("steering-form");
  }

  function limit() {
    const f = form();
    return f ? Number(f.dataset.maxAbsCoefficient) || Infinity : Infinity;
  }

  function cards() {
    return document.querySelectorAll("#selected-features .feature-card");
  }

  function parts(card) {
    return {
      slider: card.querySelector('input[name="coefficient"]'),
      box: card.querySelector(".coefficient-number"),
      output: card.querySelector(".coefficient-value"),
      error: card.querySelector(".coefficient-error"),
    };
  }

  // 5 -> "5.0", 12 -> "12", 26.84 -> "26.8", 150 -> "150" (panel.py's SelectedFeature.scale_label).
  function scaleNumber(value) {
    if (value < 10) return value.toFixed(1);
    return value >= 100 || Number.isInteger(value) ? value.toFixed(0) : value.toFixed(1);
  }

  // The slider spans ±max(base, |value|): a typed 12 widens it to ±12 and its scale reads −12 / +12.
  function fit(card, value) {
    const slider = parts(card).slider;
    const base = Number(slider.dataset.baseRange) || BASE_RANGE;
    const bound = Math.max(base, Math.ceil(Math.abs(value)));
    slider.min = String(-bound);
    slider.max = String(bound);
    const low = card.querySelector(".scale-min");
    const high = card.querySelector(".scale-max");
    // At its base range an uncalibrated card also names the unit (2‖h‖, set by steering.js).
    const note = bound === base && card.dataset.baseNote ? " = ±" + card.dataset.baseNote : "";
    if (low) low.textContent = "−" + scaleNumber(bound) + note.replace("±", "−") + " (suppress)";
    if (high) high.textContent = "+" + scaleNumber(bound) + note.replace("±", "+") + " (amplify)";
  }

  function checkLimit(card, value) {
    const error = parts(card).error;
    const max = limit();
    if (!error) return;
    if (!Number.isFinite(value)) {
      error.textContent = "Type a number.";
    } else if (Math.abs(value) > max) {
      error.textContent = "The limit of this training is ±" + max + ": the server refuses a coefficient beyond it.";
    } else {
      error.textContent = "";
    }
  }

  // Every selected coefficient is 0: steering changes nothing, so both columns will read the same.
  function syncControlRun() {
    const notice = document.getElementById("control-run-notice");
    if (!notice) return;
    const all = Array.from(cards());
    notice.hidden = all.length === 0 || !all.every(function (card) { return Number(parts(card).slider.value) === 0; });
  }

  // A value set by a button, a preset or a typed number: the range first, so the slider never clamps it.
  function set(card, value, fromBox) {
    const p = parts(card);
    fit(card, value);
    p.slider.value = String(value);
    if (!fromBox && p.box) p.box.value = String(value);
    if (p.output) p.output.textContent = value.toFixed(2);
    checkLimit(card, value);
    syncControlRun();
  }

  function prepare(card) {
    const p = parts(card);
    if (!p.box) return;
    const max = limit();
    if (Number.isFinite(max)) {
      p.box.min = String(-max);
      p.box.max = String(max);
    }
    set(card, Number(p.slider.value), false);
  }

  document.addEventListener("input", function (event) {
    const target = event.target;
    const card = target.closest("#selected-features .feature-card");
    if (!card) return;
    if (target.classList.contains("coefficient-number")) {
      const value = target.value.trim() === "" ? NaN : Number(target.value);
      if (Number.isFinite(value)) {
        set(card, value, true);
      } else {
        checkLimit(card, value);
      }
    } else if (target.matches('input[name="coefficient"]')) {
      // Dragged: steps of 0.1 (the slider's own step is "any", so typed values stay exact); the range stays
      // put under the pointer.
      const value = Math.round(Number(target.value) / DRAG_STEP) * DRAG_STEP;
      const rounded = Number(value.toFixed(1));
      target.value = String(rounded);
      const p = parts(card);
      if (p.box) p.box.value = String(rounded);
      if (p.output) p.output.textContent = rounded.toFixed(2);
      checkLimit(card, rounded);
      syncControlRun();
    }
  });

  // A number box left empty or half-typed shows the coefficient the form will send. The Sweep box: a disabled
  // multipliers input is not sent, so the run (and the URL, panel_state.js) has a sweep only while it is ticked.
  document.addEventListener("change", function (event) {
    const target = event.target;
    if (target.id === "sweep") {
      const multipliers = document.getElementById("sweep-multipliers");
      if (multipliers) multipliers.disabled = !target.checked;
      return;
    }
    if (!target.classList.contains("coefficient-number")) return;
    const card = target.closest(".feature-card");
    if (card && !Number.isFinite(target.value.trim() === "" ? NaN : Number(target.value))) {
      set(card, Number(parts(card).slider.value), false);
    }
  });

  window.SteerLabCoefficients = { set: set, fit: fit };

  document.addEventListener("DOMContentLoaded", function () {
    const selected = document.getElementById("selected-features");
    if (selected) new MutationObserver(syncControlRun).observe(selected, { childList: true });
    htmx.onLoad(function (element) {
      const found = element.matches && element.matches(".feature-card") ? [element] : element.querySelectorAll(".feature-card");
      found.forEach(prepare);
      syncControlRun();
    });
  });
})();

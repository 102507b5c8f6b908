// The steering panel's client-side state: selected feature cards, coefficient sliders, layer grid and the
// Generate button. Requests and streaming are htmx's; this file only keeps the form consistent.
(function () {
  "use strict";

  const CONFIRM_TRAINING_CHANGE = "Changing training job will clear selected features. Continue?";
  const MANY_LAYERS = 4;
  // Uncalibrated features (no max activation) take coefficients in residual-stream units: their sliders span
  // ±2‖h‖, with ‖h‖ the residual norm at the SAE's layer, measured on the prompt by the server.
  const RESIDUAL_SPAN = 2;
  // ‖h‖ is an average: the first characters of a long prompt estimate it as well, in a shorter forward.
  const SCALE_PROMPT_CHARS = 2000;
  // {norm, layer} measured on the prompt as it is (htmx's #residual-scale asks; an edit forgets it).
  let residualScale = null;

  function form() {
    return document.getElementById("steering-form");
  }

  function featureCards() {
    return document.querySelectorAll("#selected-features .feature-card");
  }

  function syncFeatures() {
    const count = featureCards().length;
    const counter = document.getElementById("feature-count");
    if (counter) counter.textContent = String(count);
    const empty = document.getElementById("features-empty");
    if (empty) empty.hidden = count > 0;
    const notice = document.getElementById("training-notice");
    if (notice) notice.hidden = count === 0;
    document.querySelectorAll("#feature-results .feature-result, #prompt-features .feature-result").forEach(function (row) {
      const added = !!document.querySelector('#selected-features .feature-card[data-feature-id="' + row.dataset.featureId + '"]');
      const button = row.querySelector(".btn-add");
      if (button) {
        button.disabled = added;
        button.textContent = added ? "Added" : "+ Add";
      }
    });
  }

  function syncLayers() {
    const boxes = document.querySelectorAll('#layers input[name="layers"]');
    let checked = 0;
    boxes.forEach(function (box) {
      if (box.checked) checked += 1;
      box.closest(".layer-chip").classList.toggle("checked", box.checked);
    });
    const count = document.getElementById("layer-count");
    if (count) count.textContent = String(checked);
    const warning = document.getElementById("layers-warning");
    if (warning) {
      warning.hidden = checked <= MANY_LAYERS;
      document.getElementById("layers-warning-count").textContent = String(checked);
    }
  }

  function syncGenerate() {
    const f = form();
    const button = document.getElementById("generate-button");
    if (!f || !button) return;
    const streaming = !!document.querySelector('#run-result[data-state="streaming"]');
    const busy = streaming || f.classList.contains("htmx-request");
    const hasPrompt = f.elements.prompt.value.trim() !== "";
    button.classList.toggle("is-generating", busy);
    button.disabled = busy || !hasPrompt || featureCards().length === 0;
    button.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function syncAll() {
    syncFeatures();
    syncLayers();
    syncGenerate();
  }

  function setCoefficient(card, value) {
    window.SteerLabCoefficients.set(card, value); // coefficients.js: range, number box, shown value, limit
  }

  function uncalibratedCards() {
    return document.querySelectorAll('#selected-features .feature-card[data-calibrated="false"]');
  }

  function formatNumber(value) {
    return value >= 100 ? value.toFixed(0) : value.toFixed(1);
  }

  function applyResidualScale() {
    if (!residualScale) return;
    const cap = Number(form().dataset.maxAbsCoefficient) || Infinity;
    const norm = residualScale.norm;
    const span = Math.min(cap, Math.max(0.1, Math.round(RESIDUAL_SPAN * norm * 10) / 10));
    const nudge = Math.round(norm * 10) / 10;
    uncalibratedCards().forEach(function (card) {
      const slider = card.querySelector('input[name="coefficient"]');
      const value = Number(slider.value);
      // The base range; coefficients.js widens it to the card's own coefficient (a range input would clamp it).
      slider.dataset.baseRange = String(span);
      card.dataset.baseNote = "2‖h‖";
      setCoefficient(card, value);
      card.querySelector(".scale-unit").textContent = "‖h‖ = " + formatNumber(norm) + " at L" + residualScale.layer;
      card.querySelector('[data-coefficient-role="suppress"]').dataset.coefficient = String(-nudge);
      card.querySelector('[data-coefficient-role="amplify"]').dataset.coefficient = String(nudge);
    });
  }

  // Cards added later use the prompt's last measurement, or ask for one.
  function scaleUncalibratedCards() {
    if (uncalibratedCards().length === 0) return;
    if (residualScale) applyResidualScale();
    else htmx.trigger("#residual-scale", "measure");
  }

  // "Select All" within the server's limit on layers: that many layers around the SAE's own layer.
  function selectAllLayers(button) {
    const boxes = Array.from(document.querySelectorAll('#layers input[name="layers"]'));
    const most = Math.min(boxes.length, Number(button.dataset.maxLayers) || boxes.length);
    const centre = Number(button.dataset.saeLayer) || 0;
    const first = Math.max(0, Math.min(centre - Math.floor(most / 2), boxes.length - most));
    boxes.forEach(function (box, position) { box.checked = position >= first && position < first + most; });
    syncLayers();
  }

  function copyText(text, button) {
    const done = function () {
      button.classList.add("copied");
      setTimeout(function () { button.classList.remove("copied"); }, 1200);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
      return;
    }
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    done();
  }

  document.addEventListener("click", function (event) {
    const target = event.target.closest("button");
    if (!target) return;
    const card = target.closest(".feature-card");
    if (target.dataset.action === "remove-feature" && card) {
      card.remove();
      syncAll();
    } else if (target.dataset.coefficient !== undefined && card) {
      setCoefficient(card, Number(target.dataset.coefficient));
    } else if (target.dataset.action === "select-all-layers") {
      selectAllLayers(target);
    } else if (target.dataset.action === "clear-layers") {
      // "Clear" returns to the training's own layer: steering needs at least one.
      const keep = target.dataset.defaultLayer;
      document.querySelectorAll('#layers input[name="layers"]').forEach(function (box) { box.checked = box.value === keep; });
      syncLayers();
    } else if (target.dataset.copyTarget) {
      const source = document.querySelector(target.dataset.copyTarget);
      if (source) copyText(source.textContent, target);
    }
  });

  document.addEventListener("input", function (event) {
    if (event.target.closest("#steering-form")) syncGenerate();
    if (event.target.id === "prompt") {
      // The measurement kept or in flight is of the prompt before this edit; hx-trigger measures it again.
      residualScale = null;
      htmx.trigger("#residual-scale", "htmx:abort");
    }
  });

  document.addEventListener("change", function (event) {
    const target = event.target;
    if (target.matches('#layers input[name="layers"]')) syncLayers();
    if (target.id === "training-select") {
      if (featureCards().length > 0 && !window.confirm(CONFIRM_TRAINING_CHANGE)) {
        target.value = target.dataset.current;
        return;
      }
      window.location.assign(target.dataset.panelUrl + "?training=" + encodeURIComponent(target.value));
    }
  });

  // Enter in the search box or a preset field must not start a comparison; in the preset fields it saves.
  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && event.target.closest("#preset-save")) {
      event.preventDefault();
      htmx.trigger("#preset-save-button", "click");
      return;
    }
    if (event.key !== "Enter" || !event.target.matches("#steering-form input")) return;
    const name = event.target.name || "";
    if (name === "q" || name.indexOf("preset_") === 0) event.preventDefault();
  });

  document.addEventListener("htmx:beforeRequest", function (event) {
    // A feature already on the list is not added twice.
    const source = event.detail.elt;
    if (source.classList && source.classList.contains("btn-add")) {
      const id = source.closest(".feature-result").dataset.featureId;
      if (document.querySelector('#selected-features .feature-card[data-feature-id="' + id + '"]')) {
        event.preventDefault();
      }
    }
  });

  // #residual-scale's request: only with an uncalibrated card to scale, on the prompt's first characters.
  document.addEventListener("htmx:configRequest", function (event) {
    if (event.detail.elt.id !== "residual-scale") return;
    const prompt = (event.detail.parameters.prompt || "").slice(0, SCALE_PROMPT_CHARS);
    if (uncalibratedCards().length === 0 || prompt.trim() === "") event.preventDefault();
    else event.detail.parameters.prompt = prompt;
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    // The sliders keep their range when measuring fails: generation does not depend on it.
    if (event.detail.elt.id === "residual-scale" && event.detail.successful) {
      const body = JSON.parse(event.detail.xhr.responseText);
      residualScale = { norm: body.residual_norm, layer: body.layer };
      applyResidualScale();
    }
    syncGenerate();
  });
  // The form's own request marks it htmx-request from here on: Generate is disabled until the run has ended.
  document.addEventListener("htmx:beforeSend", syncGenerate);
  document.addEventListener("DOMContentLoaded", function () {
    syncAll();
    htmx.onLoad(function (element) {
      syncAll();
      if (element.querySelector && (element.matches(".feature-card") || element.querySelector(".feature-card"))) {
        scaleUncalibratedCards();
      }
    });
  });
})();

// The result area after Generate: brought into view as soon as the run is submitted, so the columns that
// stream are on screen (on a phone they are a long scroll below the button). The end of the run replaces the
// area again without scrolling: the reader may have moved on.
(function () {
  "use strict";

  document.addEventListener("DOMContentLoaded", function () {
    htmx.onLoad(function (element) {
      if (element.id === "run-result" && element.dataset.state === "streaming" && document.getElementById("steering-form")) {
        element.scrollIntoView({ behavior: "smooth", block: "start" });
      }
    });
  });
})();

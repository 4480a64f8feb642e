// lorakit: after a bake, refresh the host's checkpoint dropdown so the new model shows at once;
// refill lorakit's own lists when its tab is shown.
(function () {
    var REFRESH_IDS = ["refresh_sd_model_checkpoint", "forge_refresh_checkpoint", "refresh_checkpoint"];

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function refreshHostCheckpoints() {
        var app = root();
        for (var i = 0; i < REFRESH_IDS.length; i++) {
            var b = app.querySelector("#" + REFRESH_IDS[i]);
            if (b) {
                b.click();
                return true;
            }
        }
        return false;
    }

    var seen = {};

    function check() {
        // any lorakit job that wrote a checkpoint (bake, merge) reports it in a hidden "done" box
        var boxes = root().querySelectorAll("[id^=lorakit_][id$=_done] textarea, [id^=lorakit_][id$=_done] input");
        for (var i = 0; i < boxes.length; i++) {
            var v = boxes[i].value;
            if (v && v !== seen[i]) {
                seen[i] = v;
                refreshHostCheckpoints();
            }
        }
    }

    // Fill the dropdowns from the host's lists whenever the lorakit tab comes into view (on page load
    // in the standalone launcher; when its top-level tab is picked in the WebUI, which loads its model
    // after building the UI): a hidden button runs the refill.
    var shown = false;

    function checkShown() {
        var tabs = root().querySelector("#lorakit_tabs");
        var now = !!(tabs && tabs.offsetParent !== null);
        if (now && !shown) {
            var b = root().querySelector("#lorakit_show");
            if (b) b.click();
            else now = false;  // not rendered yet: try again
        }
        shown = now;
    }

    // The sub-tabs are a row of buttons (lib_lorakit/ui/app.py says why): give them the tab roles, the
    // selected one marked, so keyboard and screen-reader users meet tabs.
    function markTabs() {
        var row = root().querySelector("#lorakit_tabs");
        if (!row) return;
        row.setAttribute("role", "tablist");
        var bs = row.querySelectorAll("button");
        for (var i = 0; i < bs.length; i++) {
            var on = bs[i].classList.contains("primary") ? "true" : "false";
            if (bs[i].getAttribute("role") !== "tab") bs[i].setAttribute("role", "tab");
            if (bs[i].getAttribute("aria-selected") !== on) bs[i].setAttribute("aria-selected", on);
        }
    }

    setInterval(markTabs, 300);

    if (typeof onUiUpdate === "function") {
        onUiUpdate(check);
    } else {
        setInterval(check, 1000);
    }
    setInterval(checkShown, 500);
})();

// lorakit: after a bake, refresh the host's checkpoint dropdown so the new model shows at once.
(function () {
    var last = "";
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

    function check() {
        var el = root().querySelector("#lorakit_bake_done textarea, #lorakit_bake_done input");
        if (!el) return;
        var v = el.value;
        if (v && v !== last) {
            last = v;
            refreshHostCheckpoints();
        }
    }

    if (typeof onUiUpdate === "function") {
        onUiUpdate(check);
    } else {
        setInterval(check, 1000);
    }
})();

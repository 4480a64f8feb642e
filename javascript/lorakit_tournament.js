// lorakit tournament: blind ranking from the keyboard.
// ← → select an image (or click it) · 1 2 3 rank it · B bomb (unusable) · X all bad · 0 no preference
// Enter: save this prompt's vote and go to the next · PageUp / PageDown: previous / next prompt.
// Votes go to /lorakit/v1/tournaments/{id}/votes at once and stay in localStorage until the server has them.
(function () {
    var API = "/lorakit/v1/tournaments/";
    var PENDING = "lorakit-tournament-pending";
    var S = {tid: null, ev: null, ballot: null, p: 0, sel: 0, cur: null};

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        var app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function el(id) { return root().querySelector("#" + id); }

    function esc(s) {
        return String(s == null ? "" : s).replace(/[&<>"]/g, function (c) {
            return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c];
        });
    }

    function clientId() {
        var id = sessionStorage.getItem("lorakit-tournament-client");
        if (!id) {
            id = "tab-" + Math.random().toString(36).slice(2, 10) + "-" + Date.now().toString(36);
            sessionStorage.setItem("lorakit-tournament-client", id);
        }
        return id;
    }

    function nextSeq() {
        var key = "lorakit-tournament-seq-" + clientId();
        var n = parseInt(localStorage.getItem(key) || "0", 10) + 1;
        localStorage.setItem(key, String(n));
        return n;
    }

    function pending() {
        try { return JSON.parse(localStorage.getItem(PENDING) || "[]"); } catch (e) { return []; }
    }

    function savePending(l) { localStorage.setItem(PENDING, JSON.stringify(l)); }

    function status(t) { var s = el("lorakit-tour-status"); if (s) s.textContent = t; }

    function flush() {
        var list = pending();
        if (!list.length) return;
        var groups = {};
        list.forEach(function (v) { var k = v.tid + "\u0000" + v.ev; (groups[k] = groups[k] || []).push(v); });
        Object.keys(groups).forEach(function (k) {
            var batch = groups[k];
            fetch(API + encodeURIComponent(batch[0].tid) + "/votes", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({evaluator: batch[0].ev, votes: batch.map(function (v) { return v.vote; })})
            }).then(function (r) {
                if (!r.ok) throw new Error("HTTP " + r.status);
                var sent = {};
                batch.forEach(function (v) { sent[v.vote.client + ":" + v.vote.seq] = true; });
                savePending(pending().filter(function (v) { return !sent[v.vote.client + ":" + v.vote.seq]; }));
                status("");
            }).catch(function (e) { status("vote not saved yet (" + e.message + "); kept in this browser and retried"); });
        });
    }

    function blank() { return {ranks: [], bombs: [], all_bad: false, no_preference: false}; }

    function startPrompt(p) {
        var pr = S.ballot.prompts[p];
        S.p = p;
        S.sel = 0;
        S.cur = pr.vote ? JSON.parse(JSON.stringify(pr.vote)) : blank();
        render();
    }

    function render() {
        var box = el("lorakit-tour-view");
        if (!box || !S.ballot) return;
        var pr = S.ballot.prompts[S.p];
        var voted = S.ballot.prompts.filter(function (x) { return x.vote; }).length;
        el("lorakit-tour-head").innerHTML = "<b>Prompt " + (S.p + 1) + " of " + S.ballot.prompts.length + "</b> · " +
            voted + " voted · evaluator <code>" + esc(S.ev) + "</code>" + (S.ballot.revealed ? " · <b>revealed</b>" : "") +
            "<div class='lorakit-tour-prompt'>" + esc(pr.prompt) + " <span>(seed " + esc(pr.seed) + ")</span></div>";
        var html = "";
        pr.entries.forEach(function (e, i) {
            var r = S.cur.slots ? S.cur.slots.indexOf(e.letter) : S.cur.ranks.indexOf(e.letter);
            var bombed = S.cur.bombs.indexOf(e.letter) >= 0 || S.cur.all_bad;
            html += "<figure class='lorakit-tour-cell" + (i === S.sel ? " lorakit-sel" : "") + "' data-lorakit-cell='" + i + "'>" +
                (e.image ? "<img src='" + API + encodeURIComponent(S.tid) + "/image/" + encodeURIComponent(S.ev) + "/" +
                    pr.index + "/" + e.letter + "' data-lorakit-cell='" + i + "'>" : "<div class='lorakit-tour-missing'>" +
                    esc(e.status) + "</div>") +
                "<figcaption><b>" + e.letter + "</b>" +
                (r >= 0 ? " <span class='lorakit-rank lorakit-rank-" + (r + 1) + "'>" + ["1st", "2nd", "3rd"][r] + "</span>" : "") +
                (bombed ? " <span class='lorakit-badge'>BOMB</span>" : "") +
                (e.status !== "ok" ? " <span class='lorakit-badge'>" + esc(e.status.toUpperCase()) + "</span>" : "") +
                (e.candidate ? "<div class='lorakit-tour-recipe'>" + esc(e.candidate) + (e.control ? " (control)" : "") +
                    ": " + esc(e.recipe) + "</div>" : "") + "</figcaption></figure>";
        });
        el("lorakit-tour-grid").innerHTML = html;
        var flags = [];
        if (S.cur.all_bad) flags.push("all bad");
        if (S.cur.no_preference) flags.push("no preference");
        el("lorakit-tour-flags").textContent = flags.join(", ");
        box.setAttribute("data-prompt", String(S.p));
        box.setAttribute("data-voted", String(voted));
    }

    function letter(i) { return S.ballot.prompts[S.p].entries[i].letter; }

    function rank(n) {
        // three slots: pressing 2 puts the selected image 2nd (whoever was 2nd loses the place)
        var L = letter(S.sel);
        S.cur.no_preference = false;
        S.cur.all_bad = false;
        var slots = [S.cur.ranks[0] || null, S.cur.ranks[1] || null, S.cur.ranks[2] || null];
        if (S.cur.slots) slots = S.cur.slots.slice();
        slots = slots.map(function (x) { return x === L ? null : x; });
        slots[n - 1] = L;
        S.cur.slots = slots;
        S.cur.ranks = slots.filter(function (x) { return x; });
        S.cur.bombs = S.cur.bombs.filter(function (x) { return x !== L; });
        moveSel(1);
    }

    function bomb() {
        var L = letter(S.sel);
        S.cur.ranks = S.cur.ranks.filter(function (x) { return x !== L; });
        if (S.cur.slots) S.cur.slots = S.cur.slots.map(function (x) { return x === L ? null : x; });
        var i = S.cur.bombs.indexOf(L);
        if (i >= 0) S.cur.bombs.splice(i, 1); else S.cur.bombs.push(L);
        moveSel(1);
    }

    function moveSel(d) {
        var n = S.ballot.prompts[S.p].entries.length;
        S.sel = (S.sel + d + n) % n;
        render();
    }

    function submit() {
        var pr = S.ballot.prompts[S.p];
        var vote = {prompt: pr.index, ranks: S.cur.ranks, bombs: S.cur.bombs, all_bad: S.cur.all_bad,
                    no_preference: S.cur.no_preference, client: clientId(), seq: nextSeq()};
        pr.vote = JSON.parse(JSON.stringify(S.cur));
        var l = pending();
        l.push({tid: S.tid, ev: S.ev, vote: vote});
        savePending(l);
        flush();
        var next = S.p + 1;
        for (var i = 1; i <= S.ballot.prompts.length; i++) {
            var q = (S.p + i) % S.ballot.prompts.length;
            if (!S.ballot.prompts[q].vote) { next = q; break; }
        }
        if (next >= S.ballot.prompts.length) next = S.ballot.prompts.length - 1;
        startPrompt(next);
    }

    function load(tid, ev) {
        S.tid = tid;
        S.ev = ev;
        fetch(API + encodeURIComponent(tid) + "/ballot?evaluator=" + encodeURIComponent(ev)).then(function (r) {
            if (!r.ok) throw new Error("HTTP " + r.status);
            return r.json();
        }).then(function (b) {
            S.ballot = b;
            pending().forEach(function (v) {  // unsent votes from before a reload count already
                if (v.tid === tid && v.ev === ev && b.prompts[v.vote.prompt]) {
                    b.prompts[v.vote.prompt].vote = {ranks: v.vote.ranks, bombs: v.vote.bombs, all_bad: v.vote.all_bad,
                                                     no_preference: v.vote.no_preference};
                }
            });
            var first = 0;
            for (var i = 0; i < b.prompts.length; i++) { if (!b.prompts[i].vote) { first = i; break; } }
            startPrompt(first);
            el("lorakit-tour-view").setAttribute("data-loaded", tid + "|" + ev);
            el("lorakit-tour-view").querySelectorAll("[data-lorakit-tour]").forEach(function (x) { x.disabled = false; });
            flush();
        }).catch(function (e) { status("cannot load the ballot: " + e.message); });
    }

    function active() {
        var box = el("lorakit-tour-view");
        return box && box.offsetParent !== null && S.ballot;
    }

    document.addEventListener("keydown", function (e) {
        if (!active() || e.ctrlKey || e.metaKey || e.altKey) return;
        var tag = (e.target && e.target.tagName || "").toLowerCase();
        if (tag === "input" || tag === "textarea" || tag === "select") return;
        var k = e.key;
        if (k === "1" || k === "2" || k === "3") rank(parseInt(k, 10));
        else if (k === "b" || k === "B") bomb();
        else if (k === "x" || k === "X") { S.cur = blank(); S.cur.all_bad = true; render(); }
        else if (k === "0") { S.cur = blank(); S.cur.no_preference = true; render(); }
        else if (k === "ArrowRight") moveSel(1);
        else if (k === "ArrowLeft") moveSel(-1);
        else if (k === "Enter") submit();
        else if (k === "PageDown") startPrompt(Math.min(S.p + 1, S.ballot.prompts.length - 1));
        else if (k === "PageUp") startPrompt(Math.max(S.p - 1, 0));
        else return;
        e.preventDefault();
    });

    document.addEventListener("click", function (e) {
        var t = e.target;
        if (!t || !t.closest || !S.ballot) return;
        var cell = t.closest("[data-lorakit-cell]");
        if (cell && root().querySelector("#lorakit-tour-grid").contains(cell)) {
            S.sel = parseInt(cell.getAttribute("data-lorakit-cell"), 10);
            render();
        }
        var act = t.getAttribute && t.getAttribute("data-lorakit-tour");
        if (act === "submit") submit();
        if (act === "1" || act === "2" || act === "3") rank(parseInt(act, 10));
        if (act === "bomb") bomb();
    });

    var last = "";

    function watch() {
        var a = root().querySelector("#lorakit_tour_id textarea, #lorakit_tour_id input");
        var b = root().querySelector("#lorakit_tour_evaluator textarea, #lorakit_tour_evaluator input");
        var tid = a ? a.value.trim() : "", ev = b ? b.value.trim() : "";
        var key = tid + "|" + ev;
        if (tid && ev && key !== last) {
            last = key;
            load(tid, ev);
        }
    }

    setInterval(watch, 300);
    setInterval(flush, 5000);
    window.addEventListener("online", flush);
    window.lorakitTournament = {load: load, state: S, reload: function () { if (S.tid) load(S.tid, S.ev); }};
})();

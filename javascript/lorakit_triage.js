// lorakit triage: review LoRA/baseline pairs from the keyboard (Y / M / N, arrows, U to undo).
// Decisions are sent to /lorakit/v1/triage/{id}/decisions at once and mirrored in localStorage
// until the server acknowledges them, so a dropped connection or a reload loses nothing: unsent
// decisions are replayed (the server ignores a replay of the same client and sequence number).
(function () {
    var API = "/lorakit/v1/triage/";
    var PENDING = "lorakit-triage-pending";
    var S = {tid: null, items: [], pos: 0, filter: "all", undo: [], busy: false};
    window.lorakitTriageTimings = [];

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        var app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function el(id) {
        return root().querySelector("#" + id);
    }

    function clientId() {
        var id = sessionStorage.getItem("lorakit-triage-client");
        if (!id) {
            id = "tab-" + Math.random().toString(36).slice(2, 10) + "-" + Date.now().toString(36);
            sessionStorage.setItem("lorakit-triage-client", id);
        }
        return id;
    }

    function nextSeq() {
        var key = "lorakit-triage-seq-" + clientId();
        var n = parseInt(localStorage.getItem(key) || "0", 10) + 1;
        localStorage.setItem(key, String(n));
        return n;
    }

    function pending() {
        try {
            return JSON.parse(localStorage.getItem(PENDING) || "[]");
        } catch (e) {
            return [];
        }
    }

    function savePending(list) {
        localStorage.setItem(PENDING, JSON.stringify(list));
    }

    function flush() {
        var list = pending();
        if (!list.length) return;
        var byTid = {};
        list.forEach(function (d) {
            (byTid[d.tid] = byTid[d.tid] || []).push(d);
        });
        Object.keys(byTid).forEach(function (tid) {
            var batch = byTid[tid];
            fetch(API + encodeURIComponent(tid) + "/decisions", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({decisions: batch.map(function (d) {
                    return {idx: d.idx, decision: d.decision, client: d.client, seq: d.seq};
                })})
            }).then(function (r) {
                if (!r.ok) throw new Error("HTTP " + r.status);
                return r.json();
            }).then(function (res) {
                var sent = {};
                batch.forEach(function (d) { sent[d.client + ":" + d.seq] = true; });
                savePending(pending().filter(function (d) { return !sent[d.client + ":" + d.seq]; }));
                if (tid === S.tid && res.state) showCounts(res.state);
                setStatus("");
            }).catch(function (e) {
                setStatus("not saved yet (" + e.message + "); kept in this browser and retried");
            });
        });
    }

    function setStatus(text) {
        var s = el("lorakit-triage-status");
        if (s) s.textContent = text;
    }

    function showCounts(st) {
        var c = el("lorakit-triage-counts");
        if (!c) return;
        c.textContent = st.decided + " / " + st.items + " decided · YES " + st.counts.yes + " · MAYBE " +
            st.counts.maybe + " · NO " + st.counts.no + (st.skipped ? " · " + st.skipped + " skipped" : "");
    }

    function visible() {
        return S.items.filter(function (it) {
            return S.filter === "all" || (S.filter === "undecided" ? !it.decision : it.decision === S.filter);
        });
    }

    function imgUrl(it, which) {
        return API + encodeURIComponent(S.tid) + "/image/" + it.idx + "/" + which;
    }

    var cache = {};

    function preload(it) {
        if (!it) return;
        ["lora", "baseline"].forEach(function (w) {
            var u = imgUrl(it, w);
            if (!cache[u]) {
                var im = new Image();
                im.src = u;
                cache[u] = im;
            }
        });
    }

    function badge(state) {
        if (!state || state.status === "ok") return "";
        return '<span class="lorakit-badge lorakit-badge-' + state.status + '">' + state.status.toUpperCase() + "</span>";
    }

    function esc(s) {
        return String(s == null ? "" : s).replace(/[&<>"]/g, function (c) {
            return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c];
        });
    }

    function render(t0) {
        var list = visible();
        var box = el("lorakit-triage-view");
        if (!box) return;
        if (!list.length) {
            box.querySelector(".lorakit-triage-pair").style.visibility = "hidden";
            el("lorakit-triage-info").innerHTML = S.items.length ? "<b>Nothing left in this filter.</b>" : "";
            return;
        }
        if (S.pos >= list.length) S.pos = list.length - 1;
        if (S.pos < 0) S.pos = 0;
        var it = list[S.pos];
        box.querySelector(".lorakit-triage-pair").style.visibility = "visible";
        var a = el("lorakit-triage-img-lora"), b = el("lorakit-triage-img-base");
        a.src = imgUrl(it, "lora");
        b.src = imgUrl(it, "baseline");
        el("lorakit-triage-badge-lora").innerHTML = badge(it.image);
        el("lorakit-triage-badge-base").innerHTML = badge(it.baseline);
        el("lorakit-triage-info").innerHTML =
            "<div class='lorakit-triage-name'>" + esc(it.lora) + (it.decision ? " <span class='lorakit-dec lorakit-dec-" +
                it.decision + "'>" + it.decision.toUpperCase() + "</span>" : "") + "</div>" +
            "<div>" + esc(it.category) + " · strength " + esc(it.strength) + " · " + esc(it.kind) +
            (it.trigger ? " · trigger <code>" + esc(it.trigger) + "</code>" : "") + "</div>" +
            "<div class='lorakit-triage-pos'>" + (S.pos + 1) + " of " + list.length + " (" + S.filter + ")</div>" +
            (it.warnings && it.warnings.length ? "<ul class='lorakit-warn'>" + it.warnings.map(function (w) {
                return "<li>" + esc(w) + "</li>";
            }).join("") + "</ul>" : "");
        preload(list[S.pos + 1]);
        preload(list[S.pos + 2]);
        if (t0 !== undefined) {
            Promise.all([a.decode ? a.decode() : Promise.resolve(), b.decode ? b.decode() : Promise.resolve()])
                .then(function () {
                    window.lorakitTriageTimings.push(performance.now() - t0);
                }).catch(function () {});
        }
    }

    function decide(decision, t0) {
        var list = visible();
        var it = list[S.pos];
        if (!it) return;
        S.undo.push({idx: it.idx, prev: it.decision || null});
        it.decision = decision === "clear" ? null : decision;
        var list2 = pending();
        list2.push({tid: S.tid, idx: it.idx, decision: decision, client: clientId(), seq: nextSeq()});
        savePending(list2);
        flush();
        // move on: in "undecided" the decided item leaves the list, so the position stays
        var after = visible();
        if (S.filter === "all" || after.indexOf(it) >= 0) {
            var nxt = S.pos + 1;
            for (var i = S.pos + 1; i < after.length; i++) {
                if (!after[i].decision) { nxt = i; break; }
            }
            S.pos = Math.min(nxt, after.length - 1);
        }
        render(t0);
    }

    function undo() {
        var u = S.undo.pop();
        if (!u) return;
        var it = S.items.filter(function (x) { return x.idx === u.idx; })[0];
        if (!it) return;
        it.decision = u.prev;
        var list = pending();
        list.push({tid: S.tid, idx: u.idx, decision: u.prev || "clear", client: clientId(), seq: nextSeq()});
        savePending(list);
        flush();
        var vis = visible();
        var p = vis.indexOf(it);
        if (p >= 0) S.pos = p;
        render(performance.now());
    }

    function load(tid) {
        S.tid = tid;
        S.undo = [];
        if (!tid) return;
        fetch(API + encodeURIComponent(tid) + "/items?filter=all").then(function (r) {
            if (!r.ok) throw new Error("HTTP " + r.status);
            return r.json();
        }).then(function (items) {
            S.items = items;
            var mine = pending().filter(function (d) { return d.tid === tid; });
            mine.forEach(function (d) {  // unsent decisions from before a reload count already
                var it = items.filter(function (x) { return x.idx === d.idx; })[0];
                if (it) it.decision = d.decision === "clear" ? null : d.decision;
            });
            var first = 0;
            var vis = visible();
            for (var i = 0; i < vis.length; i++) {
                if (!vis[i].decision) { first = i; break; }
            }
            S.pos = first;
            render();
            var box = el("lorakit-triage-view");
            if (box) box.setAttribute("data-loaded", tid);
            root().querySelectorAll("[data-lorakit-decide]").forEach(function (b) { b.disabled = false; });
            return fetch(API + encodeURIComponent(tid));
        }).then(function (r) {
            return r && r.ok ? r.json() : null;
        }).then(function (st) {
            if (st) showCounts(st);
            flush();
        }).catch(function (e) {
            setStatus("cannot load triage " + tid + ": " + e.message);
        });
    }

    function active() {
        var box = el("lorakit-triage-view");
        return box && box.offsetParent !== null && S.tid;
    }

    document.addEventListener("keydown", function (e) {
        if (!active() || e.ctrlKey || e.metaKey || e.altKey) return;
        var tag = (e.target && e.target.tagName || "").toLowerCase();
        if (tag === "input" || tag === "textarea" || tag === "select" || (e.target && e.target.isContentEditable)) return;
        var t0 = performance.now();
        var k = e.key.toLowerCase();
        if (k === "y") decide("yes", t0);
        else if (k === "m") decide("maybe", t0);
        else if (k === "n") decide("no", t0);
        else if (k === "u") undo();
        else if (e.key === "ArrowRight") { S.pos++; render(t0); }
        else if (e.key === "ArrowLeft") { S.pos--; render(t0); }
        else return;
        e.preventDefault();
    });

    document.addEventListener("click", function (e) {
        var t = e.target;
        if (!t || !t.getAttribute) return;
        var d = t.getAttribute("data-lorakit-decide");
        if (d) decide(d, performance.now());
        var f = t.getAttribute("data-lorakit-filter");
        if (f) {
            S.filter = f;
            S.pos = 0;
            root().querySelectorAll("[data-lorakit-filter]").forEach(function (b) {
                b.classList.toggle("lorakit-on", b.getAttribute("data-lorakit-filter") === f);
            });
            render();
        }
    });

    var lastTid = null;

    function watch() {
        var box = root().querySelector("#lorakit_triage_id textarea, #lorakit_triage_id input");
        var v = box ? box.value.trim() : "";
        if (v && v !== lastTid) {
            lastTid = v;
            load(v);
        }
    }

    setInterval(watch, 250);
    setInterval(flush, 5000);
    window.addEventListener("online", flush);
    window.lorakitTriage = {load: load, state: S, flush: flush};
})();

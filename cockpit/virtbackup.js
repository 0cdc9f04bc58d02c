/* virtbackup Cockpit page: the UI. Everything it learns or changes on the host goes through
 * `virtbackup ... --json` run with cockpit.spawn as superuser (so every check and lock of the CLI
 * applies), plus reading the files virtbackup already writes: job files (for metrics_file), the
 * metrics file, and BACKUP_DIR/logs run logs. Its own settings are /etc/virtbackup/cockpit.json.
 * Text that comes from the host (domain names, file names, error messages) is only ever put into
 * the page as text (textContent), never as HTML. */
/* global cockpit, VBModel */
"use strict";

(function () {
    const M = VBModel;
    const CONFIG_PATH = "/etc/virtbackup/cockpit.json";
    const DEFAULT_CONFIG = { virtbackup: "virtbackup", environ: [], job_files: [], backup_dirs: [] };
    const LEVEL_COLORS = { full: "vb-full", inc: "vb-inc", diff: "vb-diff" };

    let config = Object.assign({}, DEFAULT_CONFIG);
    let rows = null;            // overview rows (VBModel.summarize), null until loaded
    let jobErrors = [];
    let loading = null;
    let busy = false;           // one action at a time on this page
    const selected = {};        // dir -> selected point id

    /* ---- DOM helpers ------------------------------------------------------------------- */
    function el(tag, attrs, ...children) {
        const node = document.createElement(tag);
        for (const [k, v] of Object.entries(attrs || {})) {
            if (v === null || v === undefined || v === false)
                continue;
            if (k === "class")
                node.className = v;
            else if (k === "text")
                node.textContent = v;
            else if (k.startsWith("on"))
                node.addEventListener(k.slice(2), v);
            else
                node.setAttribute(k, v === true ? "" : v);
        }
        for (const c of children.flat()) {
            if (c === null || c === undefined || c === false)
                continue;
            node.append(c instanceof Node ? c : document.createTextNode(String(c)));
        }
        return node;
    }

    function svg(tag, attrs, ...children) {
        const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
        for (const [k, v] of Object.entries(attrs || {})) {
            if (k === "text")
                node.textContent = v;
            else if (k.startsWith("on"))
                node.addEventListener(k.slice(2), v);
            else if (v !== null && v !== undefined)
                node.setAttribute(k, v);
        }
        for (const c of children.flat())
            if (c)
                node.append(c);
        return node;
    }

    function banner(text, kind) {
        const b = document.getElementById("banner");
        if (!text) {
            b.hidden = true;
            b.textContent = "";
            return;
        }
        b.className = "vb-banner vb-banner-" + (kind || "error");
        b.textContent = text;
        b.hidden = false;
    }

    /* ---- talking to the host ----------------------------------------------------------- */
    function spawnOptions(extra) {
        return Object.assign({ superuser: "require", environ: config.environ || [] }, extra);
    }

    let accessDenied = false;

    function hostProblem(ex) {
        if (ex && ex.problem === "access-denied") {
            accessDenied = true;
            return "virtbackup needs administrative access: turn it on with the \"Limited access\" button at the top of Cockpit.";
        }
        if (ex && ex.problem === "not-found")
            return `The virtbackup command was not found ("${config.virtbackup}"): install it, or set its path in Settings.`;
        return null;
    }

    /* `virtbackup ARGS` → {rc, data, stderr}: data is the JSON it printed (its result, or
     * {error: {kind, message, exit_code}}). Never rejects. */
    function vbJson(args) {
        return new Promise(resolve => {
            cockpit.spawn([config.virtbackup, ...args], spawnOptions({ err: "message" }))
                    .then(out => resolve({ rc: 0, data: M.lastJsonObject(out), stderr: "" }))
                    .catch((ex, out) => {
                        const problem = hostProblem(ex);
                        if (problem)
                            banner(problem);
                        const data = M.lastJsonObject(out);
                        const message = (data && data.error && data.error.message) || problem ||
                              String((ex && ex.message) || ex).replace(/^virtbackup: error: /, "").trim();
                        resolve({ rc: ex && ex.exit_status !== undefined && ex.exit_status !== null ? ex.exit_status : -1,
                                  data: data || { error: { kind: (ex && ex.problem) || "failed", message, exit_code: 1 } },
                                  stderr: String((ex && ex.message) || "") });
                    });
        });
    }

    /* A long-running command with its output streamed line by line (stderr merged in):
     * onLine(line) for every line; returns {rc, data, lines, proc} once it ends. */
    function vbStream(argv, onLine, onStart) {
        const lines = [];
        let buffer = "";
        const proc = cockpit.spawn(argv, spawnOptions({ err: "out" }));
        if (onStart)
            onStart(proc);
        function feed(chunk, final) {
            buffer += chunk;
            const parts = buffer.split("\n");
            buffer = final ? "" : parts.pop();
            for (const line of parts) {
                if (!line.trim())
                    continue;
                lines.push(line);
                onLine(line);
            }
        }
        proc.stream(chunk => feed(chunk, false));
        return new Promise(resolve => {
            proc.then(() => {
                feed("\n", true);
                resolve({ rc: 0, data: M.lastJsonObject(lines.join("\n")), lines });
            }).catch(ex => {
                feed("\n", true);
                const problem = hostProblem(ex);
                if (problem)
                    banner(problem);
                const data = M.lastJsonObject(lines.join("\n"));
                const rc = ex && ex.exit_status !== undefined && ex.exit_status !== null ? ex.exit_status : -1;
                resolve({ rc, lines, data: data || { error: { kind: (ex && ex.problem) || "failed",
                                                               message: problem || (ex && ex.signal ? `stopped by signal ${ex.signal}` : String((ex && ex.message) || ex)),
                                                               exit_code: 1 } } });
            });
        });
    }

    function readFile(path) {
        return new Promise(resolve => {
            cockpit.file(path, { superuser: "require", max_read_size: 4 * 1024 * 1024 }).read()
                    .then(content => resolve(content))
                    .catch(ex => {
                        const problem = hostProblem(ex);
                        if (problem)
                            banner(problem);
                        resolve(null);
                    });
        });
    }

    /* The regular files in BACKUP_DIR/logs (find -P never follows a symlink, logs/ itself included). */
    function listLogs(dir) {
        return new Promise(resolve => {
            cockpit.spawn(["find", dir.replace(/\/+$/, "") + "/logs", "-maxdepth", "1", "-type", "f",
                "-name", "backup-*.log", "-printf", "%f\\n"], spawnOptions({ err: "ignore" }))
                    .then(out => resolve(out.split("\n").filter(Boolean)))
                    .catch(() => resolve([]));
        });
    }

    /* Settings and everything else read again (Refresh, administrative access turned on). */
    async function refreshAll() {
        accessDenied = false;
        banner(null);
        await loadConfig();
        await reload();
    }

    async function loadConfig() {
        const text = await readFile(CONFIG_PATH);
        config = Object.assign({}, DEFAULT_CONFIG);
        if (text) {
            try {
                Object.assign(config, JSON.parse(text));
            } catch (e) {
                banner(`${CONFIG_PATH} is not valid JSON: ${e.message}`);
            }
        }
    }

    async function saveConfig(next) {
        await cockpit.spawn(["mkdir", "-p", "-m", "0700", "/etc/virtbackup"], spawnOptions({ err: "message" }));
        await cockpit.file(CONFIG_PATH, { superuser: "require" }).replace(JSON.stringify(next, null, 2) + "\n");
        config = Object.assign({}, DEFAULT_CONFIG, next);
    }

    /* What the page remembers of its own runs (verify results, backups started here), per
     * browser: the CLI keeps no record of a verify. */
    function remember(kind, dir, value) {
        try {
            localStorage.setItem(`virtbackup:${kind}:${dir}`, JSON.stringify(value));
        } catch (e) { /* private mode: not remembered */ }
    }

    function recall(kind, dir) {
        try {
            return JSON.parse(localStorage.getItem(`virtbackup:${kind}:${dir}`) || "null");
        } catch (e) {
            return null;
        }
    }

    /* ---- gathering ---------------------------------------------------------------------- */
    async function pool(items, limit, fn) {
        const queue = items.slice();
        const workers = Array.from({ length: Math.min(limit, queue.length) }, async () => {
            while (queue.length)
                await fn(queue.shift());
        });
        await Promise.all(workers);
    }

    async function gatherDir(e) {
        const r = await vbJson(["list", e.dir, "--json"]);
        if (r.rc === 0 && r.data && r.data.points) {
            e.list = r.data;
            e.listError = null;
        } else {
            e.list = null;
            e.listError = (r.data && r.data.error) || { kind: "failed", message: "list failed" };
        }
        const name = M.newestBackupLog(await listLogs(e.dir));
        e.log = null;
        if (name) {
            const text = await readFile(e.dir.replace(/\/+$/, "") + "/logs/" + name);
            if (text !== null)
                e.log = Object.assign({ name, time: M.logTime(name) }, M.runLogOutcome(text));
        }
        e.verify = recall("verify", e.dir);
        e.drill = recall("drill", e.dir);
        const mine = recall("backup", e.dir);
        e.pageRun = mine ? { time: mine.time, ok: mine.ok, status: mine.ok ? "ok" : "failed",
                             message: mine.message, via: "started on this page", detailed: true } : null;
    }

    async function gather() {
        const entries = new Map();
        const errors = [];
        function entry(dir) {
            if (!entries.has(dir))
                entries.set(dir, { dir, domain: null, sources: [], list: null, listError: null, plan: null,
                                   metrics: null, log: null });
            return entries.get(dir);
        }
        for (const job of config.job_files || []) {
            const r = await vbJson(["run", job, "--dry-run", "--json"]);
            if (r.rc !== 0 || !r.data || !r.data.domains) {
                errors.push(`job file ${job}: ${(r.data && r.data.error && r.data.error.message) || "run --dry-run failed"}`);
                continue;
            }
            let metrics = {};
            const metricsFile = M.jobMetricsFile(await readFile(job));
            if (metricsFile) {
                const text = await readFile(metricsFile);
                if (text)
                    metrics = M.metricsByDomain(M.parseMetrics(text));
            }
            for (const d of r.data.domains) {
                const e = entry(d.backup_dir || `job:${job}:${d.domain}`);
                e.domain = d.domain;
                e.plan = d;
                e.sources.push(`job ${r.data.job}`);
                if (metrics[d.domain])
                    e.metrics = metrics[d.domain];
                if (!d.backup_dir)
                    e.listError = { kind: "job", message: d.error || "no backup directory" };
            }
        }
        for (const dir of config.backup_dirs || [])
            entry(dir).sources.push("added by hand");
        const list = [...entries.values()];
        await pool(list.filter(e => !e.dir.startsWith("job:")), 4, gatherDir);
        const now = Date.now() / 1000;
        return { rows: M.sortRows(list.map(e => Object.assign(M.summarize(e, now), { entry: e }))), errors };
    }

    function reload() {
        loading = gather().then(res => {
            rows = res.rows;
            jobErrors = res.errors;
            loading = null;
            render();
        });
        render();
        return loading;
    }

    async function reloadDir(dir) {
        const row = rows && rows.find(r => r.dir === dir);
        if (!row)
            return reload();
        await gatherDir(row.entry);
        const fresh = Object.assign(M.summarize(row.entry, Date.now() / 1000), { entry: row.entry });
        rows = M.sortRows(rows.map(r => (r.dir === dir ? fresh : r)));
        render();
    }

    /* ---- overview ----------------------------------------------------------------------- */
    const SEVERITY = [
        { label: "Error", cls: "vb-badge-error" },
        { label: "Warning", cls: "vb-badge-warning" },
        { label: "OK", cls: "vb-badge-ok" },
        { label: "No backups", cls: "vb-badge-none" },
    ];

    function badge(row) {
        const s = SEVERITY[row.severity];
        return el("span", { class: "vb-badge " + s.cls, "data-status": s.label.toLowerCase() }, s.label);
    }

    function sparkline(points) {
        const w = 120;
        const h = 28;
        const n = Math.max(points.length, 1);
        const max = Math.max(1, ...points.map(p => p.size || 0));
        const bw = Math.max(2, Math.min(14, Math.floor(w / n) - 2));
        const s = svg("svg", { width: w, height: h, class: "vb-spark", role: "img",
                               "aria-label": `${points.length} points` });
        points.slice(-Math.floor(w / (bw + 2))).forEach((p, i) => {
            const bh = Math.max(2, Math.round((p.size || 0) / max * (h - 2)));
            s.append(svg("rect", { x: i * (bw + 2), y: h - bh, width: bw, height: bh,
                                   class: "vb-bar " + (LEVEL_COLORS[p.level] || "") }));
        });
        return s;
    }

    function sizeBar(size, max) {
        const w = 80;
        const filled = max > 0 ? Math.max(1, Math.round(size / max * w)) : 0;
        return svg("svg", { width: w, height: 8, class: "vb-sizebar" },
                   svg("rect", { x: 0, y: 0, width: w, height: 8, class: "vb-sizebar-bg" }),
                   svg("rect", { x: 0, y: 0, width: filled, height: 8, class: "vb-sizebar-fg" }));
    }

    function lastRunCell(row) {
        if (!row.lastRun)
            return el("span", { class: "vb-muted" }, "no run recorded");
        const r = row.lastRun;
        return el("div", {},
                  el("span", { class: r.ok ? "vb-ok" : "vb-error" }, r.ok ? "succeeded" : r.status),
                  el("div", { class: "vb-muted vb-small" }, `${M.formatTime(r.time)} (${r.via})`));
    }

    function renderOverview(view) {
        document.getElementById("title").textContent = "Backups";
        if (accessDenied) {
            view.append(el("div", { class: "vb-empty", id: "no-access" },
                           el("h2", {}, "Administrative access is needed"),
                           el("p", {}, "virtbackup runs as root, like the command line. Turn on administrative access at the top of Cockpit; this page then loads by itself.")));
            return;
        }
        if (!rows) {
            view.append(el("p", { class: "vb-loading" }, "Loading backups…"));
            return;
        }
        if (!(config.job_files || []).length && !(config.backup_dirs || []).length) {
            view.append(el("div", { class: "vb-empty" },
                           el("h2", {}, "No backups configured"),
                           el("p", {}, "Add a virtbackup job file (e.g. /etc/virtbackup/nightly.toml) or a backup directory in Settings."),
                           el("button", { class: "vb-btn vb-primary", type: "button", onclick: openSettings }, "Settings")));
            return;
        }
        for (const err of jobErrors)
            view.append(el("div", { class: "vb-alert vb-alert-error" }, err));
        const failed = rows.filter(r => r.severity === 0).length;
        const warned = rows.filter(r => r.severity === 1).length;
        const total = rows.reduce((a, r) => a + r.stored, 0);
        view.append(el("div", { class: "vb-cards" },
                       card("Domains", String(rows.length)),
                       card("Errors", String(failed), failed ? "vb-error" : ""),
                       card("Warnings", String(warned), warned ? "vb-warning" : ""),
                       card("Stored", M.formatSize(total))));
        const max = Math.max(0, ...rows.map(r => r.stored));
        const table = el("table", { class: "vb-table", id: "overview" },
                         el("thead", {}, el("tr", {}, ["Domain", "Status", "Last run", "Newest point", "Consistency",
                                                       "Chain", "Stored", "Problems"].map(h => el("th", {}, h)))));
        const body = el("tbody");
        for (const row of rows) {
            const clickable = !row.dir.startsWith("job:");
            const tr = el("tr", { class: "vb-row" + (clickable ? " vb-clickable" : ""), "data-domain": row.domain,
                                  "data-dir": row.dir, tabindex: clickable ? "0" : null,
                                  onclick: clickable ? () => cockpit.location.go(["domain"], { dir: row.dir }) : null,
                                  onkeydown: clickable ? ev => { if (ev.key === "Enter") cockpit.location.go(["domain"], { dir: row.dir }) } : null },
                          el("td", { class: "vb-domain-cell" }, el("div", { class: "vb-domain" }, row.domain),
                             el("div", { class: "vb-muted vb-small vb-path" }, clickable ? row.dir : "no backup directory"),
                             el("div", { class: "vb-muted vb-small" }, row.sources.join(", "))),
                          el("td", { class: "vb-status" }, badge(row)),
                          el("td", { class: "vb-lastrun" }, lastRunCell(row)),
                          el("td", { class: "vb-age" }, row.newest ? el("div", {}, M.formatAge(row.age) + " ago",
                                                                         el("div", { class: "vb-muted vb-small" }, `point ${row.newest.id} (${row.newest.level})`)) : "-"),
                          el("td", { class: "vb-consistency" }, row.consistency || "-"),
                          el("td", { class: "vb-chain" }, sparkline(row.points),
                             el("div", { class: "vb-small" }, `${row.chainLength} in chain, ${row.pointCount} point${row.pointCount === 1 ? "" : "s"}`)),
                          el("td", { class: "vb-stored" }, M.formatSize(row.stored), el("br"), sizeBar(row.stored, max)),
                          el("td", { class: "vb-problems" }, row.problems.length
                              ? el("ul", {}, row.problems.map(p => el("li", { class: p.severity === 0 ? "vb-error" : "vb-warning" }, p.text)))
                              : el("span", { class: "vb-muted" }, "none")));
            body.append(tr);
        }
        table.append(body);
        view.append(table);
        view.append(el("p", { class: "vb-legend" }, legend()));
    }

    function card(label, value, cls) {
        return el("div", { class: "vb-card" }, el("div", { class: "vb-card-value " + (cls || "") }, value),
                  el("div", { class: "vb-card-label" }, label));
    }

    function legend() {
        return [el("span", { class: "vb-key vb-full" }), " full ", el("span", { class: "vb-key vb-inc" }), " incremental ",
            el("span", { class: "vb-key vb-diff" }), " differential ", el("span", { class: "vb-key vb-merged" }),
            " consolidated by prune"];
    }

    /* ---- domain page -------------------------------------------------------------------- */
    function timeline(row, onSelect) {
        const points = row.points;
        const slot = 58;
        const gap = 26;
        const top = 22;
        const barMax = 120;
        const bottom = 68;
        const max = Math.max(1, ...points.map(p => p.size || 0));
        let x = 10;
        const placed = [];
        let chain = null;
        const chains = [];
        for (const p of points) {
            if (p.chain !== chain) {
                if (chain !== null)
                    x += gap;
                chain = p.chain;
                chains.push({ id: chain, x0: x, x1: x });
            }
            placed.push({ p, x });
            chains[chains.length - 1].x1 = x + slot - 8;
            x += slot;
        }
        const width = Math.max(x + 10, 300);
        const height = top + barMax + bottom;
        const s = svg("svg", { width, height, class: "vb-timeline", id: "timeline", role: "img",
                               "aria-label": `timeline of ${points.length} restore points` });
        s.append(svg("line", { x1: 0, x2: width, y1: top + barMax, y2: top + barMax, class: "vb-axis" }));
        for (const { p, x: px } of placed) {
            const h = Math.max(3, Math.round((p.size || 0) / max * barMax));
            const merged = M.consolidated(p);
            const g = svg("g", { class: "vb-point" + (selected[row.dir] === p.id ? " vb-selected" : ""),
                                 "data-point": p.id, tabindex: "0",
                                 onclick: () => onSelect(p.id),
                                 onkeydown: ev => { if (ev.key === "Enter") onSelect(p.id) } });
            g.append(svg("title", { text: `point ${p.id}: ${p.level}, ${M.formatSize(p.size)}, ${p.created}` }));
            g.append(svg("rect", { x: px - 4, y: 2, width: slot - 4, height: height - 4, class: "vb-hit" }));
            g.append(svg("rect", { x: px, y: top + barMax - h, width: slot - 12, height: h,
                                   class: "vb-bar " + (LEVEL_COLORS[p.level] || "") + (merged ? " vb-merged" : "") }));
            g.append(svg("text", { x: px + (slot - 12) / 2, y: top + barMax - h - 4, class: "vb-barlabel",
                                   text: M.formatSize(p.size) }));
            g.append(svg("text", { x: px + (slot - 12) / 2, y: top + barMax + 14, class: "vb-pointid", text: p.id }));
            g.append(svg("text", { x: px + (slot - 12) / 2, y: top + barMax + 27, class: "vb-pointdate",
                                   text: p.created.slice(5, 10) }));
            g.append(svg("text", { x: px + (slot - 12) / 2, y: top + barMax + 39, class: "vb-pointdate",
                                   text: p.created.slice(11, 16) }));
            s.append(g);
        }
        for (const c of chains) {
            const y = top + barMax + 48;
            s.append(svg("line", { x1: c.x0, x2: c.x1 - 4, y1: y, y2: y, class: "vb-chainline" }));
            s.append(svg("text", { x: c.x0, y: y + 13, class: "vb-chainlabel", text: `chain ${c.id}` }));
        }
        return s;
    }

    function details(row, id) {
        const p = row.points.find(q => q.id === id);
        if (!p)
            return el("p", { class: "vb-muted" }, "Select a point in the timeline.");
        const rowsOf = [
            ["Point", p.id], ["Level", p.level + (M.consolidated(p) ? " (consolidated by prune)" : "")],
            ["Created", p.created], ["Parent", p.parent || "-"], ["Chain", p.chain],
            ["Transport", p.transport || "-"],
            ["Consistency", (p.consistency || "-") + (p.consistency_reason ? ` (${p.consistency_reason})` : "") +
                (p.frozen_seconds !== null && p.frozen_seconds !== undefined ? `, frozen ${p.frozen_seconds.toFixed(2)} s` : "")],
            ["Encryption", p.encryption || "none"], ["Duration", `${(p.duration || 0).toFixed(2)} s`],
            ["Stored", M.formatSize(p.size)], ["Checkpoint", p.checkpoint], ["Why", p.reason || "-"],
        ];
        const t = el("table", { class: "vb-details", id: "point-details", "data-point": p.id },
                     el("tbody", {}, rowsOf.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
        const disks = el("table", { class: "vb-table vb-disks" },
                         el("thead", {}, el("tr", {}, ["Disk", "Image", "Backing", "Stored", "Virtual size", "Copied whole"].map(h => el("th", {}, h)))),
                         el("tbody", {}, Object.entries(p.disks || {}).map(([name, d]) => el("tr", {},
                             el("td", {}, name), el("td", {}, d.image), el("td", {}, d.backing || "-"),
                             el("td", {}, M.formatSize(d.size)), el("td", {}, M.formatSize(d.virtual_size)),
                             el("td", {}, d.copied_full ? (d.full_reason || "yes (full)") : "no")))));
        return el("div", {}, t, disks);
    }

    function renderDomain(view, dir) {
        if (!rows) {
            view.append(el("p", { class: "vb-loading" }, "Loading…"));
            return;
        }
        let row = rows.find(r => r.dir === dir);
        if (!row) {
            // a directory that is not configured (a link from elsewhere): show it all the same
            const e = { dir, domain: null, sources: ["opened by link"], list: null, listError: null };
            row = Object.assign(M.summarize(e, Date.now() / 1000), { entry: e });
            rows.push(row);
            reloadDir(dir);
        }
        document.getElementById("title").textContent = `Backups of ${row.domain}`;
        view.append(el("p", {}, el("a", { href: "#/", class: "vb-back", onclick: ev => { ev.preventDefault(); cockpit.location.go([]) } }, "← All domains")));
        view.append(el("div", { class: "vb-domain-head" },
                       el("h2", { id: "domain-name" }, row.domain), badge(row),
                       el("span", { class: "vb-muted" }, row.dir)));
        view.append(el("div", { class: "vb-cards" },
                       card("Last run", row.lastRun ? (row.lastRun.ok ? "succeeded" : row.lastRun.status) : "-",
                            row.lastRun && !row.lastRun.ok ? "vb-error" : ""),
                       card("Newest point", row.newest ? M.formatAge(row.age) + " ago" : "-"),
                       card("Consistency", row.consistency || "-"),
                       card("Chain length", String(row.chainLength)),
                       card("Points", String(row.pointCount)),
                       card("Stored", M.formatSize(row.stored))));
        if (row.problems.length)
            view.append(el("ul", { class: "vb-problem-list", id: "problems" },
                           row.problems.map(p => el("li", { class: p.severity === 0 ? "vb-error" : "vb-warning" }, p.text))));
        if (!selected[dir] && row.newest)
            selected[dir] = row.newest.id;
        const actions = el("div", { class: "vb-actions", id: "actions" },
                           actionButton("backup-now", "Back up now", () => actionBackup(row), true),
                           actionButton("verify", "Verify", () => actionVerify(row)),
                           actionButton("drill", "Restore drill", () => actionDrill(row), false, !row.newest),
                           actionButton("restore", "Restore as new domain", () => actionRestore(row), false, !row.newest),
                           actionButton("prune", "Prune", () => actionPrune(row), false, !row.newest),
                           actionButton("files", "Browse files", () => actionFiles(row), false, !row.newest || row.encrypted));
        view.append(actions);
        view.append(el("div", { id: "activity" }, activityNode));
        const detailBox = el("div", { id: "details-box" });
        const select = id => {
            selected[dir] = id;
            for (const g of view.querySelectorAll("#timeline .vb-point"))
                g.classList.toggle("vb-selected", g.getAttribute("data-point") === id);
            detailBox.replaceChildren(details(row, id));
        };
        if (row.points.length) {
            view.append(el("h3", {}, "Chain"));
            view.append(el("div", { class: "vb-timeline-wrap" }, timeline(row, select)));
            view.append(el("p", { class: "vb-legend" }, legend(), " · bar height: stored size"));
            view.append(el("h3", {}, "Point details"));
            view.append(detailBox);
            select(selected[dir]);
        } else if (row.listError) {
            view.append(el("div", { class: "vb-alert vb-alert-error" }, row.listError.message));
        } else {
            view.append(el("p", { class: "vb-muted" }, "No restore point yet."));
        }
        view.append(filesNode);
    }

    /* An action runs alone: its buttons are disabled from its dialog until the page shows its outcome. */
    function actionButton(id, label, fn, primary, disabled) {
        const run = async () => {
            if (busy)
                return;
            busy = true;
            render();
            try {
                await fn();
            } finally {
                busy = false;
                render();
            }
        };
        return el("button", { id: "action-" + id, type: "button", class: "vb-btn" + (primary ? " vb-primary" : ""),
                              disabled: busy || disabled, onclick: run }, label);
    }

    /* ---- modal dialogs ------------------------------------------------------------------ */
    function closeModal() {
        document.getElementById("modal-backdrop").hidden = true;
        document.getElementById("modal").replaceChildren();
    }

    /* A dialog; resolves with true on confirm, false on cancel. `validate` may return a message. */
    function openModal({ title, body, confirm, danger, validate }) {
        return new Promise(resolve => {
            const modal = document.getElementById("modal");
            const error = el("p", { class: "vb-error", id: "modal-error" });
            const ok = el("button", { type: "button", id: "modal-confirm", class: "vb-btn " + (danger ? "vb-danger" : "vb-primary") }, confirm);
            const cancel = el("button", { type: "button", id: "modal-cancel", class: "vb-btn" }, "Cancel");
            ok.addEventListener("click", async () => {
                const problem = validate ? await validate() : null;
                if (problem) {
                    error.textContent = problem;
                    return;
                }
                closeModal();
                resolve(true);
            });
            cancel.addEventListener("click", () => {
                closeModal();
                resolve(false);
            });
            modal.replaceChildren(el("h2", { id: "modal-title" }, title), body, error,
                                  el("div", { class: "vb-modal-buttons" }, ok, cancel));
            document.getElementById("modal-backdrop").hidden = false;
        });
    }

    function field(label, input, help) {
        return el("label", { class: "vb-field" }, el("span", {}, label), input,
                  help ? el("span", { class: "vb-help" }, help) : null);
    }

    function pointSelect(row, id) {
        const s = el("select", { id });
        for (const p of row.points.slice().reverse())
            s.append(el("option", { value: p.id, selected: p.id === selected[row.dir] }, `${p.id} (${p.level}, ${p.created})`));
        return s;
    }

    /* ---- activity: one running command with live output ---------------------------------- */
    let activityNode = el("div");
    const filesNode = el("div", { id: "files" });

    async function runTask(title, argv, { progress } = {}) {
        let proc = null;
        const bar = el("progress", { class: "vb-progress", id: "task-progress" });
        const state = el("span", { class: "vb-task-state", id: "task-state" }, "running");
        const elapsed = el("span", { class: "vb-muted" });
        const log = el("pre", { class: "vb-log", id: "task-log" });
        const result = el("div", { id: "task-result" });
        const cancel = el("button", { type: "button", class: "vb-btn", id: "task-cancel",
                                      onclick: () => { if (proc) proc.close("terminated") } }, "Cancel");
        activityNode = el("section", { class: "vb-task", id: "task", "data-state": "running" },
                          el("h3", {}, title, " ", state, " ", elapsed, " ", cancel),
                          el("code", { class: "vb-argv" }, ["virtbackup", ...argv.slice(argv.indexOf(config.virtbackup) + 1)].join(" ")),
                          bar, log, result);
        render();
        const started = Date.now();
        const timer = setInterval(() => { elapsed.textContent = `${Math.round((Date.now() - started) / 1000)} s` }, 500);
        const copied = {};
        let events = 0;
        const onLine = line => {
            const ev = M.progressEvent(line);
            if (ev) {
                activityNode.setAttribute("data-progress-events", String(++events));
                if (progress && ev.phase === "copy") {
                    copied[ev.disk] = [ev.done, ev.total];
                    const done = Object.values(copied).reduce((a, v) => a + v[0], 0);
                    const total = Object.values(copied).reduce((a, v) => a + v[1], 0);
                    if (total > 0) {
                        bar.max = total;
                        bar.value = done;
                    }
                    state.textContent = `copying ${M.formatSize(done)} of ${M.formatSize(total)}`;
                } else if (ev.phase) {
                    state.textContent = ev.phase;
                }
                return;
            }
            if (line.trim().startsWith("{") && M.lastJsonObject(line))
                return;     // the result: shown below
            if (line.startsWith("virtbackup: error: "))
                return;     // shown below, from the JSON result
            log.textContent += line + "\n";
            log.scrollTop = log.scrollHeight;
        };
        const r = await vbStream(argv, onLine, p => { proc = p });
        clearInterval(timer);
        elapsed.textContent = `${((Date.now() - started) / 1000).toFixed(1)} s`;
        cancel.remove();
        const failed = r.rc !== 0 || (r.data && (r.data.error || r.data.ok === false));
        activityNode.setAttribute("data-state", failed ? "failed" : "done");
        activityNode.classList.add(failed ? "vb-task-failed" : "vb-task-done");
        state.textContent = failed ? `failed (exit ${r.rc})` : "done";
        if (!bar.max || bar.max === 1) {
            bar.max = 1;
            bar.value = 1;
        }
        if (r.data && r.data.error)
            result.append(el("p", { class: "vb-error", id: "task-error" }, r.data.error.message));
        r.resultNode = result;
        return r;
    }

    function vbArgv(...args) {
        return [config.virtbackup, ...args];
    }

    /* ---- actions ------------------------------------------------------------------------ */
    async function actionBackup(row) {
        const level = el("select", { id: "backup-level" }, ["auto", "full", "inc", "diff"].map(l => el("option", { value: l }, l)));
        const ok = await openModal({
            title: `Back up ${row.domain} now`,
            body: el("div", {}, el("p", {}, `A new restore point of ${row.domain} in ${row.dir}.`),
                     field("Level", level, "auto: an incremental when the chain can go on safely, else a full (it says why)")),
            confirm: "Back up",
        });
        if (!ok)
            return;
        // progress events go to fd 3, a copy of stdout (backup --progress-fd, as `run` uses it)
        const argv = ["/bin/sh", "-c", "exec \"$@\" 3>&1", "sh",
            ...vbArgv("backup", "--level", level.value, "--json", "--progress-fd", "3", "--", row.domain, row.dir)];
        const r = await runTask(`Backup of ${row.domain} (${level.value})`, argv, { progress: true });
        const ended = Date.now() / 1000;
        if (r.rc === 0 && r.data && r.data.point) {
            const p = r.data.point;
            r.resultNode.append(el("p", { class: "vb-ok", id: "task-summary" },
                                   `Point ${p.id} recorded: ${p.level} ${p.transport || ""} backup, ${M.formatSize(p.size)} written in ${(p.duration || 0).toFixed(2)} s, ${p.consistency || "-"}-consistent.`));
            for (const w of r.data.warnings || [])
                r.resultNode.append(el("p", { class: "vb-warning" }, w));
            remember("backup", row.dir, { time: ended, ok: true, message: `point ${p.id}` });
            selected[row.dir] = p.id;
        } else {
            remember("backup", row.dir, { time: ended, ok: false, message: (r.data && r.data.error && r.data.error.message) || "backup failed" });
        }
        await reloadDir(row.dir);
    }

    async function actionVerify(row) {
        const deep = el("input", { type: "checkbox", id: "verify-deep" });
        const ok = await openModal({
            title: `Verify the backups of ${row.domain}`,
            body: el("div", {}, el("p", {}, "Checks every image against the hash recorded at backup time, its backing link, and qemu-img check."),
                     el("label", { class: "vb-check" }, deep, " Deep: also read every point's whole chain through QEMU (slower)")),
            confirm: "Verify",
        });
        if (!ok)
            return;
        const args = ["verify", row.dir, "--json"];
        if (deep.checked)
            args.splice(2, 0, "--deep");
        const r = await runTask(`Verify of ${row.domain}${deep.checked ? " (deep)" : ""}`, vbArgv(...args));
        const d = r.data || {};
        if (d.ok) {
            r.resultNode.append(el("p", { class: "vb-ok", id: "task-summary" },
                                   `ok: ${d.points.length} point(s), ${d.images_checked} image(s) verified${d.deep ? `, ${d.chains_read} chain(s) read` : ""}.`));
        } else if (d.damage && d.damage.length) {
            r.resultNode.append(el("ul", {}, d.damage.map(x => el("li", { class: "vb-error" }, `${x.image} (point ${x.point}${x.disk ? ", disk " + x.disk : ""}): ${x.problem}`))));
        }
        if (d.ok !== undefined)
            remember("verify", row.dir, { time: Date.now() / 1000, ok: d.ok, deep: !!d.deep,
                                          message: d.ok ? "" : ((d.error && d.error.message) || "damage found") });
        await reloadDir(row.dir);
    }

    async function actionDrill(row) {
        const point = pointSelect(row, "drill-point");
        const timeout = el("input", { type: "number", id: "drill-timeout", min: "1", value: "300" });
        const check = el("input", { type: "text", id: "drill-check", placeholder: "e.g. systemctl is-system-running --wait" });
        const ok = await openModal({
            title: `Restore drill of ${row.domain}`,
            body: el("div", {}, el("p", {}, "Boots the point as a throwaway domain on overlays (nothing is written to the backup directory) and waits for its guest agent; the domain is removed afterwards."),
                     field("Point", point), field("Timeout (s)", timeout),
                     field("Check command (optional)", check, "run in the guest through its agent; must exit 0")),
            confirm: "Start drill",
            validate: () => (Number(timeout.value) >= 1 ? null : "The timeout must be at least 1 second."),
        });
        if (!ok)
            return;
        const args = ["verify", row.dir, "--boot", "--point", point.value, "--timeout", String(Number(timeout.value)), "--json"];
        if (check.value.trim())
            args.splice(args.length - 1, 0, "--check", check.value.trim());
        const r = await runTask(`Restore drill of ${row.domain}, point ${point.value}`, vbArgv(...args));
        const d = r.data || {};
        if (d.ok) {
            r.resultNode.append(el("p", { class: "vb-ok", id: "task-summary" },
                                   `Point ${d.point} boots: running after ${(d.start_seconds || 0).toFixed(1)} s, guest agent answered after ${(d.agent_seconds || 0).toFixed(1)} s` +
                                   (d.check ? `, check exited ${d.check_exit}` : "") + "."));
        } else if (d.stage) {
            r.resultNode.append(el("p", { class: "vb-error" }, `Drill failed at ${d.stage}.`));
            if (d.console)
                r.resultNode.append(el("pre", { class: "vb-log" }, d.console));
        }
        remember("drill", row.dir, { time: Date.now() / 1000, ok: !!d.ok, point: point.value,
                                     message: (d.error && d.error.message) || "" });
        await reloadDir(row.dir);
    }

    async function actionRestore(row) {
        const point = pointSelect(row, "restore-point");
        const name = el("input", { type: "text", id: "restore-name", value: `${row.domain}-restored` });
        const out = el("input", { type: "text", id: "restore-output", value: `/var/lib/libvirt/images/${row.domain}-restored` });
        const start = el("input", { type: "checkbox", id: "restore-start" });
        name.addEventListener("input", () => { out.value = `/var/lib/libvirt/images/${name.value}` });
        const ok = await openModal({
            title: `Restore ${row.domain} as a new domain`,
            body: el("div", {}, el("p", {}, "Writes one standalone qcow2 per disk into the output directory (never over a file) and defines a new domain on them: new name, UUID and MAC addresses."),
                     field("Point", point), field("New domain name", name), field("Output directory", out),
                     el("label", { class: "vb-check" }, start, " Start the new domain")),
            confirm: "Restore",
            validate: () => (!name.value.trim() ? "Give the new domain a name." : !out.value.startsWith("/") ? "The output directory must be an absolute path." : null),
        });
        if (!ok)
            return;
        const args = ["restore", row.dir, out.value, "--point", point.value, "--define", name.value.trim(), "--json"];
        if (start.checked)
            args.splice(args.length - 1, 0, "--start");
        const r = await runTask(`Restore of ${row.domain} point ${point.value} as ${name.value.trim()}`, vbArgv(...args));
        const d = r.data || {};
        if (r.rc === 0 && d.images) {
            r.resultNode.append(el("p", { class: "vb-ok", id: "task-summary" },
                                   `Restored point ${d.point}` + (d.domain ? ` as domain ${d.domain.name} (${d.domain.uuid})${d.domain.started ? ", started" : ""}` : "") + "."));
            r.resultNode.append(el("ul", {}, Object.entries(d.images).map(([k, v]) => el("li", {}, `${k}: ${v}`)),
                                   (d.notes || []).map(n => el("li", { class: "vb-muted" }, n))));
        }
    }

    async function actionPrune(row) {
        const inputs = {};
        const rules = [["keep", "Keep the newest N points"], ["keep-daily", "Keep one per day, N days"],
            ["keep-weekly", "Keep one per week, N weeks"], ["keep-monthly", "Keep one per month, N months"]];
        const body = el("div", {}, el("p", {}, "Drops old points; kept points that depend on dropped ones are merged so they restore unchanged. The newest point is always kept. Preview first: nothing changes until you confirm."));
        for (const [k, label] of rules) {
            inputs[k] = el("input", { type: "number", min: "0", id: "prune-" + k, value: k === "keep" ? "7" : "0" });
            body.append(field(label, inputs[k]));
        }
        const preview = el("div", { id: "prune-preview", class: "vb-preview" });
        let previewed = null;
        const ruleArgs = () => rules.flatMap(([k]) => (Number(inputs[k].value) > 0 ? [`--${k}`, String(Number(inputs[k].value))] : []));
        const previewBtn = el("button", { type: "button", class: "vb-btn", id: "prune-preview-btn" }, "Preview");
        previewBtn.addEventListener("click", async () => {
            const args = ruleArgs();
            preview.replaceChildren(el("p", { class: "vb-loading" }, "Asking virtbackup prune --dry-run…"));
            const r = await vbJson(["prune", row.dir, ...args, "--dry-run", "--json"]);
            if (r.rc !== 0 || !r.data || !r.data.points) {
                preview.replaceChildren(el("p", { class: "vb-error" }, (r.data && r.data.error && r.data.error.message) || "prune --dry-run failed"));
                previewed = null;
                return;
            }
            previewed = args.join(" ");
            const d = r.data;
            preview.replaceChildren(
                el("p", { id: "prune-summary" }, d.dropped.length ? `Would drop ${d.dropped.length} point(s): ${d.dropped.join(", ")}; keep ${d.kept.join(", ")}.` : "Nothing would be dropped."),
                el("table", { class: "vb-table" }, el("tbody", {}, d.points.map(p => el("tr", { class: p.keep ? "" : "vb-drop" },
                    el("td", {}, p.point), el("td", {}, p.keep ? "keep" : "drop"), el("td", {}, p.reasons.join("; ")))))),
                d.changes.length ? el("ul", {}, d.changes.map(c => el("li", {}, c))) : null);
        });
        body.append(previewBtn, preview);
        const ok = await openModal({
            title: `Prune the backups of ${row.domain}`, body, confirm: "Prune", danger: true,
            validate: () => {
                const args = ruleArgs();
                if (!args.length)
                    return "Set at least one rule above 0.";
                if (previewed !== args.join(" "))
                    return "Preview these rules first.";
                return null;
            },
        });
        if (!ok)
            return;
        const r = await runTask(`Prune of ${row.domain}`, vbArgv("prune", row.dir, ...ruleArgs(), "--json"));
        const d = r.data || {};
        if (r.rc === 0 && d.kept)
            r.resultNode.append(el("p", { class: "vb-ok", id: "task-summary" },
                                   d.dropped.length ? `Dropped ${d.dropped.join(", ")}; kept ${d.kept.join(", ")}.` : "Nothing was dropped."));
        await reloadDir(row.dir);
    }

    /* ---- files -------------------------------------------------------------------------- */
    async function actionFiles(row) {
        const point = selected[row.dir] || (row.newest && row.newest.id);
        const status = el("p", { class: "vb-loading" }, `Reading the filesystems of point ${point} (starts libguestfs's appliance: a few seconds to minutes)…`);
        filesNode.replaceChildren(el("h3", {}, `Files of point ${point}`), status);
        filesNode.scrollIntoView({ block: "start" });
        const r = await vbJson(["files", row.dir, "--point", point, "fs", "--json"]);
        if (r.rc !== 0 || !r.data || !r.data.filesystems) {
            status.replaceWith(el("p", { class: "vb-error", id: "files-error" }, (r.data && r.data.error && r.data.error.message) || "files fs failed"));
            return;
        }
        const list = el("ul", { class: "vb-fslist", id: "fs-list" });
        for (const fs of r.data.filesystems) {
            list.append(el("li", {}, fs.readable
                ? el("button", { type: "button", class: "vb-linkbtn", "data-fs": fs.name, onclick: () => browse(row, point, fs.name, "/") }, fs.name)
                : el("span", { class: "vb-muted" }, fs.name),
            ` ${fs.type}${fs.label ? " \u201c" + fs.label + "\u201d" : ""} ${M.formatSize(fs.size)}${fs.readable ? "" : " (not readable)"}`));
        }
        status.replaceWith(list, el("div", { id: "files-listing" }));
    }

    async function browse(row, point, fs, path) {
        const box = filesNode.querySelector("#files-listing");
        box.replaceChildren(el("p", { class: "vb-loading" }, `Listing ${fs}:${path}…`));
        const r = await vbJson(["files", row.dir, "--point", point, "ls", `${fs}:${path}`, "--json"]);
        if (r.rc !== 0 || !r.data || !r.data.listings) {
            box.replaceChildren(el("p", { class: "vb-error", id: "files-error" }, (r.data && r.data.error && r.data.error.message) || "files ls failed"));
            return;
        }
        const entries = r.data.listings[0].entries.slice().sort((a, b) => (a.type === "directory" ? 0 : 1) - (b.type === "directory" ? 0 : 1) || a.name.localeCompare(b.name));
        const join = name => (path.endsWith("/") ? path : path + "/") + name;
        const up = path === "/" ? null : path.replace(/\/[^/]+\/?$/, "") || "/";
        box.replaceChildren(
            el("p", {}, el("strong", { id: "files-path" }, `${fs}:${path}`),
               up ? el("button", { type: "button", class: "vb-linkbtn", onclick: () => browse(row, point, fs, up) }, " ↑ up") : null),
            el("table", { class: "vb-table", id: "files-table" },
               el("thead", {}, el("tr", {}, ["Name", "Type", "Size", "Mode", "Modified", ""].map(h => el("th", {}, h)))),
               el("tbody", {}, entries.map(e => el("tr", { "data-name": e.name },
                   el("td", {}, e.type === "directory"
                       ? el("button", { type: "button", class: "vb-linkbtn", onclick: () => browse(row, point, fs, join(e.name)) }, e.name + "/")
                       : e.name + (e.target ? ` → ${e.target}` : "")),
                   el("td", {}, e.type), el("td", {}, e.type === "file" ? M.formatSize(e.size) : ""),
                   el("td", {}, e.mode), el("td", {}, e.mtime),
                   el("td", {}, e.type === "file"
                       ? el("button", { type: "button", class: "vb-btn vb-small", onclick: ev => download(row, point, fs, join(e.name), e.name, ev.target) }, "Download")
                       : ""))))));
        filesNode.scrollIntoView({ block: "start" });
    }

    /* `files cat` into a Blob the browser saves: the bytes go through the CLI like everything else. */
    function download(row, point, fs, path, name, button) {
        button.disabled = true;
        button.textContent = "Reading…";
        cockpit.spawn(vbArgv("files", row.dir, "--point", point, "cat", `${fs}:${path}`),
                      spawnOptions({ err: "message", binary: true }))
                .then(data => {
                    const url = URL.createObjectURL(new Blob([data], { type: "application/octet-stream" }));
                    const a = el("a", { href: url, download: name });
                    document.body.append(a);
                    a.click();
                    a.remove();
                    setTimeout(() => URL.revokeObjectURL(url), 60000);
                    button.textContent = "Downloaded";
                })
                .catch(ex => {
                    button.textContent = "Failed";
                    button.title = String(ex.message || ex);
                })
                .finally(() => { button.disabled = false });
    }

    /* ---- settings ----------------------------------------------------------------------- */
    async function openSettings() {
        const cmd = el("input", { type: "text", id: "settings-virtbackup", value: config.virtbackup });
        const jobs = el("textarea", { id: "settings-jobs", rows: "3" }, (config.job_files || []).join("\n"));
        const dirs = el("textarea", { id: "settings-dirs", rows: "4" }, (config.backup_dirs || []).join("\n"));
        const env = el("textarea", { id: "settings-environ", rows: "2" }, (config.environ || []).join("\n"));
        const lines = t => t.value.split("\n").map(s => s.trim()).filter(Boolean);
        const ok = await openModal({
            title: "Settings",
            body: el("div", {}, el("p", {}, `Saved in ${CONFIG_PATH} on this host.`),
                     field("Job files (one per line)", jobs, "every domain a job file selects is shown, with its last run from the job's metrics file"),
                     field("Backup directories (one per line)", dirs, "backup directories that no job file covers"),
                     field("virtbackup command", cmd, "a name on root's PATH, or an absolute path"),
                     field("Environment (NAME=VALUE, one per line)", env, "e.g. LIBGUESTFS_BACKEND=direct for files")),
            confirm: "Save",
            validate: () => {
                for (const p of [...lines(jobs), ...lines(dirs)])
                    if (!p.startsWith("/"))
                        return `Not an absolute path: ${p}`;
                for (const v of lines(env))
                    if (!/^[A-Za-z_][A-Za-z0-9_]*=/.test(v))
                        return `Not NAME=VALUE: ${v}`;
                return cmd.value.trim() ? null : "Name the virtbackup command.";
            },
        });
        if (!ok)
            return;
        loading = true;         // the page shows it is loading until the reload below is done
        render();
        try {
            await saveConfig({ virtbackup: cmd.value.trim(), job_files: lines(jobs), backup_dirs: lines(dirs), environ: lines(env) });
            banner(null);
        } catch (e) {
            banner(`Could not save ${CONFIG_PATH}: ${e.message || e}`);
        }
        await reload();
    }

    /* Cockpit's superuser state (none, sudo, ...): when administrative access is turned on
     * after the page loaded, load again. */
    function watchSuperuser() {
        try {
            const proxy = cockpit.dbus(null, { bus: "internal" }).proxy("cockpit.Superuser", "/superuser");
            let last = null;
            proxy.addEventListener("changed", async () => {
                const current = proxy.Current;
                if (last !== null && current !== last && current !== "init")
                    await refreshAll();
                last = current;
            });
        } catch (e) { /* an older Cockpit: the Refresh button does it */ }
    }

    /* ---- routing ------------------------------------------------------------------------ */
    function render() {
        const view = document.getElementById("view");
        view.replaceChildren();
        const path = cockpit.location.path;
        if (path[0] === "domain" && cockpit.location.options.dir) {
            renderDomain(view, String(cockpit.location.options.dir));
        } else {
            if (activityNode.id === "task" && !busy)
                activityNode = el("div");
            filesNode.replaceChildren();
            renderOverview(view);
        }
        document.body.setAttribute("data-loaded", rows && !loading ? "yes" : "no");
        document.body.setAttribute("data-busy", busy ? "yes" : "no");
    }

    let lastDir = null;
    function onLocation() {
        const dir = cockpit.location.options.dir || null;
        if (dir !== lastDir && !busy) {
            activityNode = el("div");
            filesNode.replaceChildren();
        }
        lastDir = dir;
        render();
    }

    document.addEventListener("DOMContentLoaded", async () => {
        document.getElementById("refresh").addEventListener("click", () => refreshAll());
        document.getElementById("settings").addEventListener("click", openSettings);
        cockpit.addEventListener("locationchanged", onLocation);
        watchSuperuser();
        await refreshAll();
        // the overview's ages and last runs stay current while it is open (not during an action
        // or a dialog, not in a hidden tab)
        setInterval(() => {
            if (!busy && !loading && !document.hidden && cockpit.location.path[0] !== "domain" &&
                    document.getElementById("modal-backdrop").hidden)
                reload();
        }, 120000);
    });
})();

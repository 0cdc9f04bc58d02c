/* virtbackup Cockpit page: the pure part. Parses what the tool writes (list/plan JSON, the
 * Prometheus metrics file, run logs) and decides each domain's status and problems. No DOM, no
 * cockpit calls: everything here takes data and returns data, so the page's judgement ("problems
 * first") lives in one place. */
"use strict";

(function (root) {
    const DAY = 86400;
    const STALE_SECONDS = 36 * 3600;      // a nightly backup missed once is a problem

    /* The one JSON object of a `--json` command: its last line that is a JSON object (stderr
     * lines may come before it when the streams are merged). */
    function lastJsonObject(text) {
        const lines = String(text || "").split("\n");
        for (let i = lines.length - 1; i >= 0; i--) {
            const line = lines[i].trim();
            if (line.startsWith("{")) {
                try {
                    const value = JSON.parse(line);
                    if (value && typeof value === "object" && !("phase" in value && "operation" in value))
                        return value;
                } catch (e) { /* not JSON: keep looking */ }
            }
        }
        return null;
    }

    /* A progress event line of `backup --progress-fd` (observe.ProgressEvent.to_json), or null. */
    function progressEvent(line) {
        const t = String(line).trim();
        if (!t.startsWith("{"))
            return null;
        try {
            const v = JSON.parse(t);
            return v && typeof v === "object" && "phase" in v && "done" in v ? v : null;
        } catch (e) {
            return null;
        }
    }

    /* The top-level `metrics_file = "..."` of a job file (TOML): the one key the page needs that
     * `run --dry-run --json` does not report. Only a basic or literal string on its own line. */
    function jobMetricsFile(toml) {
        let inTable = false;
        for (const raw of String(toml || "").split("\n")) {
            const line = raw.trim();
            if (line.startsWith("["))
                inTable = true;
            if (inTable)
                continue;
            const m = /^metrics_file\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')\s*(#.*)?$/.exec(line);
            if (m)
                return m[1] !== undefined ? m[1].replace(/\\(.)/g, "$1") : m[2];
        }
        return null;
    }

    function unescapeLabel(v) {
        return v.replace(/\\(["\\n])/g, (_m, c) => (c === "n" ? "\n" : c));
    }

    /* Prometheus text format → [{name, labels, value}] (comments skipped). */
    function parseMetrics(text) {
        const out = [];
        for (const raw of String(text || "").split("\n")) {
            const line = raw.trim();
            if (!line || line.startsWith("#"))
                continue;
            const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
            if (!m)
                continue;
            const labels = {};
            const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
            let lm;
            while ((lm = re.exec(m[3] || "")) !== null)
                labels[lm[1]] = unescapeLabel(lm[2]);
            out.push({ name: m[1], labels, value: Number(m[4]) });
        }
        return out;
    }

    /* What a job's metrics file says of each domain's last run: {domain: {status, time, job}}. */
    function metricsByDomain(samples) {
        const ends = {};
        for (const s of samples)
            if (s.name === "virtbackup_job_end_time_seconds")
                ends[s.labels.job] = s.value;
        const out = {};
        for (const s of samples) {
            if (s.name === "virtbackup_domain_status" && s.value === 1) {
                out[s.labels.domain] = {
                    status: s.labels.status,
                    time: ends[s.labels.job] || null,
                    job: s.labels.job,
                };
            }
        }
        return out;
    }

    /* Run log names: backup-YYYYmmddTHHMMSSZ-PID.log → Unix time. */
    function logTime(name) {
        const m = /^(backup|prune)-(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z-\d+\.log$/.exec(name);
        if (!m)
            return null;
        return Date.UTC(+m[2], +m[3] - 1, +m[4], +m[5], +m[6], +m[7]) / 1000;
    }

    /* The newest backup run log among `names` (a listing of BACKUP_DIR/logs). */
    function newestBackupLog(names) {
        const logs = names.filter(n => /^backup-.*\.log$/.test(n) && logTime(n) !== null).sort();
        return logs.length ? logs[logs.length - 1] : null;
    }

    /* A run log's outcome: the error that ended the run (run_log logs "backup failed: ..."), else ok. */
    function runLogOutcome(text) {
        const lines = String(text || "").split("\n").filter(l => l.trim());
        for (let i = lines.length - 1; i >= 0; i--) {
            const m = /^\S+ ERROR \S+: (.*)$/.exec(lines[i]);
            if (m) {
                const msg = m[1].replace(/^backup failed: [A-Za-z]+: /, "");
                return { ok: false, message: msg };
            }
        }
        return { ok: true, message: lines.length ? lines[lines.length - 1].replace(/^\S+ \S+ \S+: /, "") : "" };
    }

    function pointTime(p) {
        return Date.parse(p.created) / 1000;
    }

    /* Points of the newest chain (its full and what is layered on it). */
    function newestChain(points) {
        if (!points.length)
            return [];
        const chain = points[points.length - 1].chain;
        return points.filter(p => p.chain === chain);
    }

    /* A point that prune rewrote (a consolidated base, or an image rebased onto one) keeps its
     * images under new names: points/0008/vda.1.qcow2. */
    function consolidated(p) {
        return Object.values(p.disks || {}).some(d => /\.\d+\.qcow2$/.test(d.image || ""));
    }

    function storedSize(points) {
        return points.reduce((a, p) => a + (p.size || 0), 0);
    }

    /* One overview row from what was gathered about a backup dir:
     *   e = {dir, domain, sources, list, listError, plan, metrics, log, pageRun, verify, drill}
     * → {severity: 0 error | 1 warning | 2 ok | 3 none, status, lastRun, problems: [...], ...}. */
    function summarize(e, now) {
        const points = (e.list && e.list.points) || [];
        const newest = points.length ? points[points.length - 1] : null;
        const problems = [];
        let lastRun = null;
        const runs = [];
        if (e.metrics)
            runs.push({ time: e.metrics.time, ok: e.metrics.status === "ok", status: e.metrics.status,
                        message: e.metrics.status === "ok" ? "" : `${e.metrics.status} in the last run of job ${e.metrics.job}`,
                        via: `job ${e.metrics.job}`, detailed: false });
        if (e.log)
            runs.push({ time: e.log.time, ok: e.log.ok, status: e.log.ok ? "ok" : "failed",
                        message: e.log.message, via: `run log ${e.log.name}`, detailed: true });
        if (e.planRun)
            runs.push(e.planRun);
        // newest first; a job's failure in its metrics and a failed run log within two minutes of
        // it are the same run: the run log says why
        runs.sort((a, b) => (b.time || 0) - (a.time || 0));
        if (runs.length) {
            lastRun = runs[0];
            for (const r of runs.slice(1)) {
                if (Math.abs((r.time || 0) - (lastRun.time || 0)) <= 120 && !r.ok && !lastRun.ok &&
                        r.detailed && !lastRun.detailed)
                    lastRun = Object.assign({}, r, { time: lastRun.time, via: `${lastRun.via}, ${r.via}` });
            }
        }
        if (lastRun && lastRun.status === "failed")
            problems.push({ severity: 0, text: `Last run failed: ${lastRun.message || "see the run log"}` });
        if (e.listError)
            problems.push({ severity: e.listError.kind === "backup-dir" ? 1 : 0, text: e.listError.message });
        if (e.plan && e.plan.action === "fail")
            problems.push({ severity: 0, text: `The job would fail: ${e.plan.error}` });
        if (e.plan && e.plan.action === "backup" && e.plan.why && /bitmap|inconsistent|missing|lost|broken/i.test(e.plan.why))
            problems.push({ severity: 1, text: `Chain health: ${e.plan.why}` });
        if (e.verify && !e.verify.ok)
            problems.push({ severity: 0, text: `Damage found by verify (${formatTime(e.verify.time)}): ${e.verify.message}` });
        if (e.drill && !e.drill.ok)
            problems.push({ severity: 1, text: `The last restore drill (point ${e.drill.point}, ${formatTime(e.drill.time)}) failed: ${e.drill.message}` });
        if (newest) {
            for (const [disk, img] of Object.entries(newest.disks || {}))
                if (img.full_reason)
                    problems.push({ severity: 1, text: `Chain health: disk ${disk} copied whole in point ${newest.id}: ${img.full_reason}` });
            const age = now - pointTime(newest);
            if (age > STALE_SECONDS)
                problems.push({ severity: 1, text: `The newest point is ${formatAge(age)} old` });
        } else if (!e.listError && e.list) {
            problems.push({ severity: 1, text: "No restore point yet" });
        }
        const severity = problems.length ? Math.min(...problems.map(p => p.severity))
            : (points.length ? 2 : 3);
        const chain = newestChain(points);
        return {
            dir: e.dir,
            domain: (e.list && e.list.domain) || e.domain || "?",
            sources: e.sources || [],
            severity,
            problems: problems.sort((a, b) => a.severity - b.severity),
            lastRun,
            newest,
            age: newest ? now - pointTime(newest) : null,
            consistency: newest ? newest.consistency || null : null,
            chainLength: chain.length,
            pointCount: points.length,
            stored: storedSize(points),
            points,
            encrypted: !!(e.list && e.list.encryption),
        };
    }

    /* Problems first (errors, then warnings), then by domain name. */
    function sortRows(rows) {
        return rows.slice().sort((a, b) => a.severity - b.severity || a.domain.localeCompare(b.domain) ||
                                          a.dir.localeCompare(b.dir));
    }

    function formatSize(n) {
        if (n === null || n === undefined)
            return "-";
        const units = ["B", "KiB", "MiB", "GiB", "TiB"];
        let v = n;
        let i = 0;
        while (v >= 1024 && i < units.length - 1) {
            v /= 1024;
            i++;
        }
        return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
    }

    function formatAge(seconds) {
        if (seconds === null || seconds === undefined)
            return "-";
        const s = Math.max(0, Math.round(seconds));
        if (s < 90)
            return `${s} s`;
        if (s < 90 * 60)
            return `${Math.round(s / 60)} min`;
        if (s < 2 * DAY)
            return `${(s / 3600).toFixed(1)} h`;
        return `${(s / DAY).toFixed(1)} days`;
    }

    function formatTime(unix) {
        if (!unix)
            return "-";
        return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
    }

    root.VBModel = {
        lastJsonObject, progressEvent, jobMetricsFile, parseMetrics, metricsByDomain, logTime,
        newestBackupLog, runLogOutcome, pointTime, newestChain, consolidated, storedSize, summarize,
        sortRows, formatSize, formatAge, formatTime, STALE_SECONDS,
    };
})(typeof window !== "undefined" ? window : globalThis);

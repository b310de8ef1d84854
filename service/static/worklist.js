// befund worklist: renders studies from the HTTP API with textContent only (never innerHTML
// with data) and polls every few seconds. No external assets, no framework.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  const api = body.dataset.api;
  const pollMs = Number(body.dataset.pollMs) || 2000;
  const live = document.getElementById("live");
  let lastJson = null;
  let lastRows = [];

  // ---- small DOM helpers -------------------------------------------------------------------

  function el(tag, opts, children) {
    const node = document.createElement(tag);
    if (opts) {
      if (opts.cls) node.className = opts.cls;
      if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
      if (opts.title) node.title = String(opts.title);
      if (opts.attrs) for (const [k, v] of Object.entries(opts.attrs)) node.setAttribute(k, String(v));
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function localUrl(url) {
    // Only same-origin paths ("/..."), never "//host" or "javascript:".
    return typeof url === "string" && url.startsWith("/") && !url.startsWith("//") ? url : null;
  }

  // ---- formatting ----------------------------------------------------------------------------

  const STATES = {
    receiving: ["Receiving", "st-busy"],
    waiting: ["Waiting", "st-wait"],
    queued: ["Waiting", "st-wait"],
    pending: ["Waiting", "st-wait"],
    running: ["Running", "st-busy"],
    done: ["Done", "st-done"],
    delivering: ["Delivering", "st-busy"],
    delivered: ["Delivered", "st-done"],
    not_analysed: ["Not analysed", "st-na"],
    delivery_failed: ["Delivery failed", "st-fail"],
    dead: ["Delivery failed", "st-fail"],
    failed: ["Failed", "st-fail"],
  };

  function stateKey(s) {
    return String(s || "").toLowerCase().replace(/[\s-]+/g, "_");
  }

  function notAnalysed(row) {
    const s = stateKey(row.state);
    return s === "not_analysed" ||
      (row.present === null && !!row.reason && (s === "done" || s === "delivered" || s === "failed"));
  }

  function stateLabel(row) {
    const s = notAnalysed(row) ? "not_analysed" : stateKey(row.state);
    const known = STATES[s];
    return known ? known : [String(row.state || "unknown"), "st-wait"];
  }

  // Certainty of the stated verdict (calibrated by the model card). Never "100%": no model is
  // certain, and a value that would round to it, or anything above 99 %, reads ">99%".
  function pct(c) {
    if (c === null || c === undefined || c === "" || isNaN(Number(c))) return "";
    const v = Number(c);
    return v > 0.99 ? ">99%" : Math.round(v * 100) + "%";
  }

  function fmtTime(epoch) {
    if (!epoch) return "";
    const d = new Date(Number(epoch) * 1000);
    const now = new Date();
    const hm = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    if (d.toDateString() === now.toDateString()) return hm;
    return d.toLocaleDateString([], {year: "numeric", month: "short", day: "numeric"}) + " " + hm;
  }

  function fmtAgo(epoch) {
    if (!epoch) return "";
    const s = Math.max(0, Date.now() / 1000 - Number(epoch));
    if (s < 60) return "just now";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  function personName(pn) {
    // DICOM PN "Family^Given^Middle^Prefix^Suffix" -> "Family, Prefix Given Middle Suffix"
    const alpha = String(pn || "").split("=")[0];
    const p = alpha.split("^");
    const family = (p[0] || "").trim();
    const rest = [p[3], p[1], p[2], p[4]].filter((x) => x && x.trim()).join(" ");
    if (!family && !rest) return "(no name)";
    return rest ? family + ", " + rest : family;
  }

  function modelText(row) {
    if (!row.model) return "";
    return row.model + (row.model_version ? " " + row.model_version : "") + (row.run > 1 ? " (run " + row.run + ")" : "");
  }

  function verdictNode(row) {
    if (notAnalysed(row)) return el("span", {cls: "flag flag-na", text: "Not analysed"});
    if (row.present === true) return el("span", {cls: "flag flag-present", text: "\u25B2 Present"});
    if (row.present === false) return el("span", {cls: "flag flag-absent", text: "Absent"});
    return el("span", {cls: "flag flag-none", text: "\u2014"});
  }

  function stateNode(row) {
    const [label, cls] = stateLabel(row);
    const wrap = el("div", {cls: "state"}, [el("span", {cls: "st " + cls, text: label})]);
    if (row.reason && (notAnalysed(row) || cls === "st-fail")) {
      wrap.appendChild(el("div", {cls: "reason", text: row.reason}));
    }
    return wrap;
  }

  function thumbNode(row, big) {
    const url = localUrl(row.key_image);
    if (!url) return el("div", {cls: big ? "thumb-big none" : "thumb none", text: "no image"});
    return el("img", {cls: big ? "thumb-big" : "thumb",
      attrs: {src: url, alt: "Key image", loading: "lazy", width: big ? 384 : 64, height: big ? 384 : 64}});
  }

  function order(row) {
    if (row.present === true) return 0;
    if (notAnalysed(row)) return 1;
    return 2;
  }

  function sortRows(rows) {
    return rows.slice().sort((a, b) => (order(a) - order(b)) || ((b.received_at || 0) - (a.received_at || 0)));
  }

  // ---- the worklist ----------------------------------------------------------------------------

  function matches(row, needle) {
    if (!needle) return true;
    const hay = [row.patient_name, row.patient_id, row.accession, row.modality, row.model,
      row.state, row.reason].join(" ").toLowerCase();
    return hay.includes(needle);
  }

  function renderWorklist(data) {
    const rows = sortRows((data && data.studies) || []);
    lastRows = rows;
    const needle = (document.getElementById("filter").value || "").trim().toLowerCase();
    const tbody = document.getElementById("rows");
    const frag = document.createDocumentFragment();
    let shown = 0;
    for (const row of rows) {
      if (!matches(row, needle)) continue;
      shown += 1;
      const href = "/view/" + encodeURIComponent(row.study_uid || "");
      const link = el("a", {cls: "patient", text: personName(row.patient_name), attrs: {href: href}});
      const tr = el("tr", {cls: "row " + (row.present === true ? "is-positive" : notAnalysed(row) ? "is-na" : ""),
        attrs: {"data-study-uid": row.study_uid || "", "data-href": href}}, [
        el("td", {cls: "c-img"}, [thumbNode(row, false)]),
        el("td", null, [verdictNode(row)]),
        el("td", {cls: "num", text: row.present === null || row.present === undefined ? "" : pct(row.certainty)}),
        el("td", null, [link, el("div", {cls: "sub", text: row.patient_id ? "ID " + row.patient_id : ""})]),
        el("td", {text: row.accession || ""}),
        el("td", {text: row.modality || ""}),
        el("td", {title: fmtAgo(row.received_at)}, [el("div", {text: fmtTime(row.received_at)}),
          el("div", {cls: "sub", text: fmtAgo(row.received_at)})]),
        el("td", {text: modelText(row)}),
        el("td", null, [stateNode(row)]),
      ]);
      frag.appendChild(tr);
    }
    clear(tbody);
    tbody.appendChild(frag);
    const positives = rows.filter((r) => r.present === true).length;
    const na = rows.filter(notAnalysed).length;
    document.getElementById("count-positive").textContent = positives + " positive";
    document.getElementById("count-not-analysed").textContent = na + " not analysed";
    document.getElementById("count-total").textContent = rows.length + (rows.length === 1 ? " study" : " studies");
    document.getElementById("empty").hidden = shown > 0;
  }

  // ---- the detail page -------------------------------------------------------------------------

  function table(headers, rows) {
    const thead = el("thead", null, [el("tr", null, headers.map((h) => el("th", {text: h})))]);
    const tbody = el("tbody", null, rows.map((cells) => el("tr", null, cells.map((c) =>
      c instanceof Node ? el("td", null, [c]) : el("td", {text: c === null || c === undefined ? "" : c})))));
    return el("table", {cls: "grid"}, [thead, tbody]);
  }

  function timings(t) {
    if (!t) return "";
    return Object.entries(t).map(([k, v]) => k + " " + Number(v).toFixed(Number(v) < 10 ? 2 : 1) + " s").join(" \u00B7 ");
  }

  function fmtAbs(epoch) {
    return epoch ? new Date(Number(epoch) * 1000).toLocaleString() : "";
  }

  function yesNo(p) {
    return p === true ? "Present" : p === false ? "Absent" : "";
  }

  function fact(label, value) {
    return el("div", {cls: "fact"}, [el("dt", {text: label}), value instanceof Node ? el("dd", null, [value])
      : el("dd", {text: value === null || value === undefined || value === "" ? "\u2014" : value})]);
  }

  function renderDetail(study) {
    const root = document.getElementById("study");
    const series = study.series || [];
    const jobs = study.jobs || [];
    const deliveries = study.deliveries || [];
    const head = el("div", {cls: "detail-head " + (study.present === true ? "is-positive" : "")}, [
      el("div", {cls: "detail-title"}, [
        el("h1", {text: personName(study.patient_name)}),
        el("div", {cls: "sub", text: [study.patient_id ? "ID " + study.patient_id : "",
          study.accession ? "Accession " + study.accession : "", study.study_date || ""].filter(Boolean).join(" \u00B7 ")}),
      ]),
      el("div", {cls: "detail-verdict"}, [verdictNode(study),
        el("span", {cls: "certainty", text: study.present === null ? "" : pct(study.certainty)})]),
    ]);
    const facts = el("dl", {cls: "facts"}, [
      fact("State", stateNode(study)),
      fact("Model", modelText(study)),
      fact("Modality", study.modality),
      fact("Received", fmtAbs(study.received_at)),
      fact("Updated", fmtAbs(study.updated_at)),
      fact("Priority", study.priority === "high" ? "High" : "Normal"),
      fact("Series / images", (study.series_count || 0) + " / " + (study.instance_count || 0)),
      fact("Study UID", study.study_uid),
    ]);
    const top = el("div", {cls: "detail-top"}, [thumbNode(study, true), facts]);
    clear(root);
    root.appendChild(head);
    root.appendChild(top);
    root.appendChild(el("h2", {text: "Series"}));
    root.appendChild(series.length ? table(["Series UID", "Modality", "Description", "Images", "State"],
      series.map((s) => [s.series_uid, s.modality, s.description, s.instance_count, s.state]))
      : el("p", {cls: "sub", text: "No series."}));
    root.appendChild(el("h2", {text: "Analyses"}));
    root.appendChild(jobs.length ? table(["Job", "Model", "Run", "State", "Attempts", "Finding", "Certainty",
      "Reason / last error", "Timings"],
    jobs.map((j) => [j.id, (j.model || "") + " " + (j.model_version || ""), j.run, j.state, j.attempts,
      yesNo(j.present), j.present === null ? "" : pct(j.certainty), j.reason || j.last_error || "", timings(j.timings)]))
      : el("p", {cls: "sub", text: "No analyses yet."}));
    root.appendChild(el("h2", {text: "Deliveries"}));
    root.appendChild(deliveries.length ? table(["Job", "Destination", "Kind", "State", "Attempts", "Last error",
      "Next attempt"],
    deliveries.map((d) => [d.job_id, d.destination, d.kind, d.state, d.attempts, d.last_error || "",
      d.next_attempt_at ? fmtAbs(d.next_attempt_at) : ""]))
      : el("p", {cls: "sub", text: "Nothing delivered yet."}));
    document.title = "befund - " + personName(study.patient_name);
  }

  // ---- polling -----------------------------------------------------------------------------------

  function render(data) {
    if (page === "worklist") renderWorklist(data);
    else if (page === "detail" && data) renderDetail(data);
  }

  function setLive(ok, text) {
    live.textContent = text;
    live.className = "live " + (ok ? "ok" : "down");
  }

  // A node that cannot receive or analyse says so above the list: silence must not read as
  // "no findings". The alert lists each failing check of GET /status.
  async function pollStatus() {
    const alert = document.getElementById("node-alert");
    if (!alert) return;
    let text = "";
    try {
      const res = await fetch("/status", {credentials: "same-origin", cache: "no-store",
        headers: {"Accept": "application/json", "X-Requested-With": "fetch"}});
      if (res.status === 200 || res.status === 503) {
        const st = await res.json();
        const bad = (st.checks || []).filter((c) => !c.ok);
        if (!st.ready) {
          text = "This node is not ready; studies sent now may not be analysed. " +
            bad.map((c) => c.name + ": " + c.detail).join("; ");
        }
      } else if (res.status !== 401) {
        text = "The node's status cannot be read (HTTP " + res.status + ").";
      }
    } catch (err) {
      text = "The node cannot be reached; the list below may be out of date.";
    }
    alert.textContent = text;
    alert.hidden = text === "";
    const empty = document.getElementById("empty");  // "studies appear here" is untrue then
    if (empty) {
      empty.dataset.text = empty.dataset.text || empty.textContent;
      empty.textContent = text ? "No studies yet." : empty.dataset.text;
    }
  }

  async function poll() {
    pollStatus();
    try {
      const res = await fetch(api, {credentials: "same-origin", cache: "no-store",
        headers: {"Accept": "application/json", "X-Requested-With": "fetch"}});
      if (res.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(location.pathname));
        return;
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const text = await res.text();
      if (text !== lastJson) {
        lastJson = text;
        render(JSON.parse(text));
      }
      setLive(true, "live");
      const upd = document.getElementById("updated");
      if (upd) upd.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      setLive(false, "offline, retrying");
    } finally {
      setTimeout(poll, pollMs);
    }
  }

  function start() {
    const island = document.getElementById("initial-data");
    let initial = null;
    try { initial = JSON.parse(island.textContent); } catch (e) { initial = null; }
    if (page === "worklist") {
      document.getElementById("filter").addEventListener("input", () => renderWorklist({studies: lastRows}));
      document.getElementById("rows").addEventListener("click", (ev) => {
        if (ev.target.closest("a")) return;
        const tr = ev.target.closest("tr[data-href]");
        if (tr) window.location.assign(tr.dataset.href);
      });
    }
    if (initial) render(initial);
    if (api) poll();
    else setLive(true, "");
  }

  start();
})();

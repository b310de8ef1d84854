// befund worklist: renders studies from the HTTP API with textContent only (never innerHTML
// with data) and polls every few seconds. No external assets, no framework.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  const api = body.dataset.api;
  const pollMs = Number(body.dataset.pollMs) || 2000;
  const live = document.getElementById("live");
  const permissions = new Set(String(body.dataset.may || "").split(" ").filter(Boolean));
  let lastJson = null;
  let lastRows = [];
  let pollTimer = null;
  let lastStatus = null;

  function may(permission) {
    return permissions.has(permission);
  }

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

  function webUrl(url) {
    // The PACS viewer: an http(s) address from the node's viewer_url template, nothing else.
    return typeof url === "string" && /^https?:\/\/[^\s]+$/i.test(url) ? url : null;
  }

  function viewerLink(row) {
    const url = webUrl(row.viewer_url);
    if (!url) return null;
    return el("a", {cls: "viewer", text: "Open in viewer",
      attrs: {href: url, target: "_blank", rel: "noopener noreferrer"}});
  }

  async function post(path) {
    const res = await fetch(path, {method: "POST", credentials: "same-origin", cache: "no-store",
      headers: {"Accept": "application/json", "X-Requested-With": "fetch"}});
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) throw new Error((body && (body.detail || body.error)) || ("HTTP " + res.status));
    return body;
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

  function stateText(state) {
    // Any state in words: "not_analysed" never reaches the page as it is stored.
    const known = STATES[stateKey(state)];
    if (known) return known[0];
    const words = String(state || "unknown").replace(/[_-]+/g, " ").trim();
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function stateLabel(row) {
    const s = notAnalysed(row) ? "not_analysed" : stateKey(row.state);
    const known = STATES[s];
    return known ? known : [stateText(row.state), "st-wait"];
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

  function fmtStudyDate(da) {
    // DICOM DA "20240411" -> "11 Apr 2024" in the reader's locale.
    const m = /^(\d{4})(\d{2})(\d{2})$/.exec(String(da || "").trim());
    if (!m) return String(da || "");
    const d = new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3]));
    return d.toLocaleDateString([], {year: "numeric", month: "short", day: "numeric"});
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
    // "Intracranial hemorrhage" / "No intracranial hemorrhage detected" / "Not analysed".
    if (notAnalysed(row)) return el("span", {cls: "flag flag-na", text: "Not analysed"});
    if (row.present === true) {
      return el("span", {cls: "flag flag-present", text: "\u25B2 " + (row.verdict_text || "Finding present")});
    }
    if (row.present === false) {
      return el("span", {cls: "flag flag-absent", text: row.verdict_text || "No finding detected"});
    }
    return el("span", {cls: "flag flag-none", text: "\u2014"});
  }

  // The finding's volume a segmentation model measured ("12.3 mL"), "" when none did.
  function volumeText(volume) {
    if (volume === null || volume === undefined || volume === "" || isNaN(Number(volume))) return "";
    return Number(volume).toFixed(1) + " mL";
  }

  function volumeNode(row) {
    const text = volumeText(row.volume_ml);
    return text ? el("span", {cls: "volume", text: text, title: "volume segmented by " + (row.volume_model || "the model")}) : null;
  }

  function certaintyText(row) {
    if (row.present === null || row.present === undefined) return "";
    const p = pct(row.certainty);
    return p ? p + " certain" : "";
  }

  function stateNode(row, full) {
    const [label, cls] = stateLabel(row);
    const wrap = el("div", {cls: "state"}, [el("span", {cls: "st " + cls, text: label})]);
    if (row.reason && (notAnalysed(row) || cls === "st-fail")) {
      // The list gives the reason in words; the detail view adds the identifiers.
      const text = full ? row.reason : (row.reason_text || row.reason);
      wrap.appendChild(el("div", {cls: "reason", text: text, title: full ? null : row.reason}));
    }
    return wrap;
  }

  function reviewText(review) {
    if (!review) return "";
    const what = review.action === "dismissed" ? "Dismissed" : "Acknowledged";
    return what + " by " + review.user + ", " + fmtTime(review.at);
  }

  function reviewNode(row) {
    if (row.review) {
      return el("span", {cls: "review review-" + (row.review.action || ""), text: reviewText(row.review)});
    }
    if (row.present !== true || !may("acknowledge")) return null;
    const uid = row.study_uid || "";
    const act = (action, label, cls) => {
      const b = el("button", {cls: "btn " + cls, text: label,
        attrs: {type: "button", "data-action": action, "data-study-uid": uid}});
      return b;
    };
    return el("span", {cls: "review-actions"}, [act("acknowledge", "Acknowledge", "btn-ack"),
      act("dismiss", "Dismiss", "btn-dismiss")]);
  }

  async function review(button) {
    button.disabled = true;
    try {
      await post("/studies/" + encodeURIComponent(button.dataset.studyUid) + "/" + button.dataset.action);
      refreshNow();
    } catch (err) {
      button.disabled = false;
      showError("Could not " + button.dataset.action + ": " + err.message);
    }
  }

  function showError(text) {
    const alert = document.getElementById("action-error") || (() => {
      const p = el("p", {cls: "node-alert", attrs: {id: "action-error", role: "alert"}});
      document.querySelector("main").prepend(p);
      return p;
    })();
    alert.textContent = text;
    alert.hidden = !text;
  }

  function thumbNode(row, big) {
    const url = localUrl(row.key_image);
    if (!url) return el("div", {cls: big ? "thumb-big none" : "thumb none", text: "no image"});
    return el("img", {cls: big ? "thumb-big" : "thumb",
      attrs: {src: url, alt: "Key image", loading: "lazy", width: big ? 384 : 64, height: big ? 384 : 64}});
  }

  function keyImages(study) {
    // Every key image the result names, readable size; a click shows it at full size.
    const views = (study.key_image_views || []).filter((v) => localUrl(v.url));
    if (!views.length) return thumbNode(study, true);
    return el("div", {cls: "key-images"}, views.map((v, i) => el("figure", {cls: "key-image"}, [
      el("img", {cls: "key", attrs: {src: v.url, alt: "Key image " + (i + 1) + " of " + views.length + ": " + v.label,
        width: 512, "data-full": v.url}}),
      el("figcaption", {text: "Key image " + (i + 1) + " of " + views.length + " \u00B7 " + v.label}),
    ])));
  }

  function enlarge(url, alt) {
    const overlay = el("div", {cls: "lightbox", attrs: {role: "dialog", "aria-label": alt}}, [
      el("img", {attrs: {src: url, alt: alt}}),
      el("p", {cls: "lightbox-hint", text: "Click or press Escape to close"}),
    ]);
    const close = () => { overlay.remove(); document.removeEventListener("keydown", onKey); };
    const onKey = (ev) => { if (ev.key === "Escape") close(); };
    overlay.addEventListener("click", close);
    document.addEventListener("keydown", onKey);
    document.body.appendChild(overlay);
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
      stateText(row.state), row.reason_text, row.verdict_text].join(" ").toLowerCase();
    return hay.includes(needle);
  }

  function unacknowledged(row) {
    return row.present === true && !row.review;
  }

  const SHOW = {
    all: () => true,
    unacknowledged: unacknowledged,
    positive: (row) => row.present === true,
    "not-analysed": notAnalysed,
  };

  function timeCell(epoch) {
    if (!epoch) return el("td", {text: ""});
    return el("td", {title: fmtAgo(epoch)}, [el("div", {text: fmtTime(epoch)}),
      el("div", {cls: "sub", text: fmtAgo(epoch)})]);
  }

  function renderWorklist(data) {
    const rows = sortRows((data && data.studies) || []);
    lastRows = rows;
    const needle = (document.getElementById("filter").value || "").trim().toLowerCase();
    const show = SHOW[document.getElementById("show").value] || SHOW.all;
    const tbody = document.getElementById("rows");
    const frag = document.createDocumentFragment();
    let shown = 0;
    for (const row of rows) {
      if (!show(row) || !matches(row, needle)) continue;
      shown += 1;
      const href = "/view/" + encodeURIComponent(row.study_uid || "");
      const link = el("a", {cls: "patient", text: personName(row.patient_name), attrs: {href: href}});
      const tr = el("tr", {cls: "row " + (row.present === true ? "is-positive" : notAnalysed(row) ? "is-na" : ""),
        attrs: {"data-study-uid": row.study_uid || "", "data-href": href}}, [
        el("td", {cls: "c-img"}, [thumbNode(row, false)]),
        el("td", {cls: "c-finding"}, [verdictNode(row), volumeNode(row)]),
        el("td", {cls: "num", text: certaintyText(row)}),
        el("td", null, [link, el("div", {cls: "sub", text: row.patient_id ? "ID " + row.patient_id : ""}),
          viewerLink(row)]),
        el("td", {text: row.accession || ""}),
        el("td", {cls: "c-date", text: fmtStudyDate(row.study_date)}),
        el("td", {text: row.modality || ""}),
        timeCell(row.received_at),
        timeCell(row.result_at),
        el("td", {text: modelText(row)}),
        el("td", null, [stateNode(row, false)]),
        el("td", {cls: "c-review"}, [reviewNode(row)]),
      ]);
      frag.appendChild(tr);
    }
    clear(tbody);
    tbody.appendChild(frag);
    const positives = rows.filter((r) => r.present === true).length;
    const na = rows.filter(notAnalysed).length;
    document.getElementById("count-positive").textContent = positives + " positive";
    document.getElementById("count-unacknowledged").textContent =
      rows.filter(unacknowledged).length + " not yet acknowledged";
    document.getElementById("count-not-analysed").textContent = na + " not analysed";
    document.getElementById("count-total").textContent = rows.length + (rows.length === 1 ? " study" : " studies");
    document.getElementById("empty").hidden = shown > 0;
  }

  // ---- dead letters (admin) ---------------------------------------------------------------------

  async function pollDeadLetters() {
    const section = document.getElementById("dead-letters");
    if (!section || !may("resend")) return;
    try {
      const res = await fetch("/deliveries?state=dead", {credentials: "same-origin", cache: "no-store",
        headers: {"Accept": "application/json", "X-Requested-With": "fetch"}});
      if (!res.ok) return;
      renderDeadLetters((await res.json()).deliveries || []);
    } catch (err) {
      // the main poll says when the node cannot be reached
    }
  }

  function renderDeadLetters(rows) {
    const section = document.getElementById("dead-letters");
    const tbody = document.getElementById("dead-letter-rows");
    clear(tbody);
    for (const d of rows) {
      const act = (action, label) => el("button", {cls: "btn btn-" + action, text: label,
        attrs: {type: "button", "data-delivery": d.id, "data-action": action}});
      const study = el("a", {text: d.accession ? "Accession " + d.accession : "study",
        attrs: {href: "/view/" + encodeURIComponent(d.study_uid || "")}});
      tbody.appendChild(el("tr", {attrs: {"data-delivery-id": d.id}}, [
        el("td", {text: d.id}), el("td", null, [study]), el("td", {text: d.kind + " to " + d.destination}),
        el("td", {text: d.attempts}), el("td", {cls: "reason", text: d.last_error || ""}),
        el("td", {text: fmtAbs(d.created_at)}),
        el("td", null, [act("resend", "Resend"), may("discard") ? act("discard", "Discard") : null]),
      ]));
    }
    section.hidden = rows.length === 0;
  }

  async function deliveryAction(button) {
    const {delivery, action} = button.dataset;
    if (action === "discard" && !window.confirm("Discard delivery " + delivery + "? It will not be sent.")) return;
    button.disabled = true;
    try {
      await post("/deliveries/" + encodeURIComponent(delivery) + "/" + action);
      pollDeadLetters();
      refreshNow();
    } catch (err) {
      button.disabled = false;
      showError("Could not " + action + " delivery " + delivery + ": " + err.message);
    }
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
    return p === true ? "Present" : p === false ? "Not detected" : "";
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
          study.accession ? "Accession " + study.accession : "",
          study.study_date ? "Study date " + fmtStudyDate(study.study_date) : ""].filter(Boolean).join(" \u00B7 ")}),
        viewerLink(study),
      ]),
      el("div", {cls: "detail-verdict"}, [verdictNode(study), volumeNode(study),
        el("span", {cls: "certainty", text: certaintyText(study)}), reviewNode(study)]),
    ]);
    const facts = el("dl", {cls: "facts"}, [
      fact("State", stateNode(study, true)),
      fact("Model", modelText(study)),
      fact("Modality", study.modality),
      fact("Received", fmtAbs(study.received_at)),
      fact("Result", fmtAbs(study.result_at)),
      fact("Review", reviewText(study.review) || (study.present === true ? "Not yet acknowledged" : "")),
      fact("Priority", study.priority === "high" ? "High" : "Normal"),
      fact("Series / images", (study.series_count || 0) + " / " + (study.instance_count || 0)),
      fact("Study UID", study.study_uid),
    ]);
    const top = el("div", {cls: "detail-top"}, [facts]);
    clear(root);
    root.appendChild(head);
    root.appendChild(top);
    root.appendChild(el("h2", {text: "Key images"}));
    root.appendChild(keyImages(study));
    root.appendChild(el("h2", {text: "Series"}));
    root.appendChild(series.length ? table(["Series UID", "Modality", "Description", "Images", "State"],
      series.map((s) => [s.series_uid, s.modality, s.description, s.instance_count, stateText(s.state)]))
      : el("p", {cls: "sub", text: "No series."}));
    root.appendChild(el("h2", {text: "Analyses"}));
    root.appendChild(jobs.length ? table(["Job", "Model", "Run", "State", "Attempts", "Finding", "Certainty",
      "Reason / last error", "Result at", "Timings"],
    jobs.map((j) => [j.id, (j.model || "") + " " + (j.model_version || "") + (j.mode === "shadow" ? " (shadow, not delivered)" : ""),
      j.run, stateText(j.state), j.attempts,
      [yesNo(j.present), volumeText((j.measurements || {}).volume_ml)].filter(Boolean).join(", "),
      j.present === null ? "" : pct(j.certainty), j.reason || j.last_error || "",
      fmtAbs(j.finished_at), timings(j.timings)]))
      : el("p", {cls: "sub", text: "No analyses yet."}));
    root.appendChild(el("h2", {text: "Deliveries"}));
    // "Next attempt" only where one will be made: a pending delivery.
    root.appendChild(deliveries.length ? table(["Job", "Destination", "Kind", "State", "Attempts", "Last error",
      "Queued", "Delivered", "Next attempt"],
    deliveries.map((d) => [d.job_id, d.destination, d.kind, stateText(d.state), d.attempts, d.last_error || "",
      fmtAbs(d.created_at), fmtAbs(d.delivered_at),
      d.state === "pending" && d.next_attempt_at ? fmtAbs(d.next_attempt_at) : ""]))
      : el("p", {cls: "sub", text: "Nothing delivered yet."}));
    document.title = "befund - " + personName(study.patient_name);
  }

  // ---- polling -----------------------------------------------------------------------------------

  // ---- the shadow view (ml role): shadow models' results beside the active ones, by UID --------

  function verdictShort(side) {
    if (!side) return "\u2014";
    const v = side.present === true ? "positive" : side.present === false ? "negative" : stateText(side.state);
    const score = side.score === null || side.score === undefined ? "" : " (" + Number(side.score).toFixed(2) + ")";
    return side.version + ": " + v + score;
  }

  function renderShadow(data) {
    const rows = (data && data.rows) || [];
    const tbody = document.getElementById("shadow-rows");
    clear(tbody);
    for (const r of rows) {
      const agree = r.agree === true ? "yes" : r.agree === false ? "NO" : "";
      tbody.appendChild(el("tr", {cls: r.agree === false ? "is-positive" : ""}, [
        el("td", {text: fmtAbs(r.created_at)}), el("td", {text: r.study_uid}), el("td", {text: r.series_uid}),
        el("td", {text: r.model}), el("td", {text: verdictShort(r.active)}), el("td", {text: verdictShort(r.shadow)}),
        el("td", {text: agree})]));
    }
    document.getElementById("count-shadow").textContent = rows.length + " shadow results";
    document.getElementById("count-disagree").textContent = rows.filter((r) => r.agree === false).length + " disagree";
    document.getElementById("empty").hidden = rows.length > 0;
  }

  function render(data) {
    if (page === "worklist") renderWorklist(data);
    else if (page === "detail" && data) renderDetail(data);
    else if (page === "shadow") renderShadow(data);
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
        lastStatus = st;
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
    const notice = document.getElementById("delivery-notice");
    if (notice && lastStatus) {
      const nowhere = lastStatus.deliveries && lastStatus.deliveries.notice;
      notice.textContent = nowhere || "";
      notice.hidden = !nowhere;
    }
    const empty = document.getElementById("empty");  // "studies appear here" is untrue then
    if (empty) {
      empty.dataset.text = empty.dataset.text || empty.textContent;
      empty.textContent = text ? "No studies yet." : empty.dataset.text;
    }
  }

  function refreshNow() {
    lastJson = null;
    if (pollTimer) clearTimeout(pollTimer);
    poll();
  }

  async function poll() {
    pollStatus();
    pollDeadLetters();
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
      pollTimer = setTimeout(poll, pollMs);
    }
  }

  function start() {
    const island = document.getElementById("initial-data");
    let initial = null;
    try { initial = JSON.parse(island.textContent); } catch (e) { initial = null; }
    if (page === "worklist") {
      const rerender = () => renderWorklist({studies: lastRows});
      document.getElementById("filter").addEventListener("input", rerender);
      document.getElementById("show").addEventListener("change", rerender);
      document.getElementById("rows").addEventListener("click", (ev) => {
        const button = ev.target.closest("button[data-action]");
        if (button) { review(button); return; }
        if (ev.target.closest("a")) return;
        const tr = ev.target.closest("tr[data-href]");
        if (tr) window.location.assign(tr.dataset.href);
      });
      document.getElementById("dead-letter-rows").addEventListener("click", (ev) => {
        const button = ev.target.closest("button[data-action]");
        if (button) deliveryAction(button);
      });
    }
    if (page === "detail") {
      document.getElementById("study").addEventListener("click", (ev) => {
        const button = ev.target.closest("button[data-action]");
        if (button) { review(button); return; }
        const img = ev.target.closest("img[data-full]");
        if (img) enlarge(img.dataset.full, img.alt);
      });
    }
    if (initial) render(initial);
    if (api) poll();
    else setLive(true, "");
  }

  start();
})();

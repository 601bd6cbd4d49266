// runledger: follow a command's log through the events API.
//
// Every piece of log output becomes a DOM text node (textContent); nothing
// from a log is ever parsed as HTML. ANSI SGR sequences become classes (16
// colours) or CSSOM colours computed here from integers (256 and RGB); other
// escape sequences are dropped, other control characters are shown in caret
// notation (^@ for NUL), dimmed.
(function () {
  "use strict";

  var pane = document.getElementById("log");
  if (!pane) { return; }
  var eventsUrl = pane.getAttribute("data-events-url");
  var commandUrl = pane.getAttribute("data-command-url");
  var stateLine = document.getElementById("log-state");
  var followBox = document.getElementById("follow");
  var MAX_LINES = 50000;
  // Lines longer than this are cut in the view (the raw log has them whole).
  var LINE_CHARACTERS_SHOWN = 20000;
  var PAGE_LIMIT = 500;
  var WAIT_SECONDS = 20;

  var after = 0;
  var lineCount = 0;
  var trimmedNotice = null;
  var streams = {};

  function streamState(name) {
    if (!streams[name]) {
      streams[name] = {
        decoder: new TextDecoder("utf-8", { fatal: false }),
        pending: "",
        line: null,
        lineLength: 0,
        hidden: null,
        carriage: false,
        sgr: freshSgr()
      };
    }
    return streams[name];
  }

  function freshSgr() {
    return { bold: false, dim: false, italic: false, underline: false, strike: false,
      inverse: false, fg: null, bg: null };
  }

  // -- colours --------------------------------------------------------------

  var CUBE = [0, 95, 135, 175, 215, 255];

  function colour256(n) {
    if (n < 16) { return { index: n }; }
    if (n < 232) {
      n -= 16;
      return { rgb: [CUBE[Math.floor(n / 36)], CUBE[Math.floor(n / 6) % 6], CUBE[n % 6]] };
    }
    var grey = 8 + 10 * (n - 232);
    return { rgb: [grey, grey, grey] };
  }

  function clampByte(value) {
    var n = parseInt(value, 10);
    if (!(n >= 0)) { return 0; }
    return n > 255 ? 255 : n;
  }

  function applySgr(sgr, text) {
    var codes = text === "" ? [0] : text.split(/[;:]/).map(function (part) {
      return part === "" ? 0 : parseInt(part, 10);
    });
    for (var i = 0; i < codes.length; i++) {
      var code = codes[i];
      if (code === 0) { var reset = freshSgr(); for (var key in reset) { sgr[key] = reset[key]; } }
      else if (code === 1) { sgr.bold = true; }
      else if (code === 2) { sgr.dim = true; }
      else if (code === 3) { sgr.italic = true; }
      else if (code === 4) { sgr.underline = true; }
      else if (code === 7) { sgr.inverse = true; }
      else if (code === 9) { sgr.strike = true; }
      else if (code === 22) { sgr.bold = false; sgr.dim = false; }
      else if (code === 23) { sgr.italic = false; }
      else if (code === 24) { sgr.underline = false; }
      else if (code === 27) { sgr.inverse = false; }
      else if (code === 29) { sgr.strike = false; }
      else if (code >= 30 && code <= 37) { sgr.fg = { index: code - 30 }; }
      else if (code === 39) { sgr.fg = null; }
      else if (code >= 40 && code <= 47) { sgr.bg = { index: code - 40 }; }
      else if (code === 49) { sgr.bg = null; }
      else if (code >= 90 && code <= 97) { sgr.fg = { index: code - 90 + 8 }; }
      else if (code >= 100 && code <= 107) { sgr.bg = { index: code - 100 + 8 }; }
      else if (code === 38 || code === 48) {
        var colour = null;
        if (codes[i + 1] === 5 && i + 2 < codes.length) {
          colour = colour256(clampByte(codes[i + 2])); i += 2;
        } else if (codes[i + 1] === 2 && i + 4 < codes.length) {
          colour = { rgb: [clampByte(codes[i + 2]), clampByte(codes[i + 3]), clampByte(codes[i + 4])] };
          i += 4;
        } else { i = codes.length; }
        if (code === 38) { sgr.fg = colour; } else { sgr.bg = colour; }
      }
    }
  }

  function styledSpan(sgr, text) {
    var span = document.createElement("span");
    span.textContent = text;
    var fg = sgr.inverse ? sgr.bg : sgr.fg;
    var bg = sgr.inverse ? sgr.fg : sgr.bg;
    if (sgr.bold) { span.classList.add("b"); }
    if (sgr.dim) { span.classList.add("d"); }
    if (sgr.italic) { span.classList.add("i"); }
    if (sgr.underline) { span.classList.add("u"); }
    if (sgr.strike) { span.classList.add("s"); }
    if (fg && fg.rgb) { span.style.color = "rgb(" + fg.rgb.join(",") + ")"; }
    else if (fg) { span.classList.add("f" + fg.index); }
    else if (sgr.inverse) { span.classList.add("fx"); }
    if (bg && bg.rgb) { span.style.backgroundColor = "rgb(" + bg.rgb.join(",") + ")"; }
    else if (bg) { span.classList.add("g" + bg.index); }
    else if (sgr.inverse) { span.classList.add("gx"); }
    return span;
  }

  // -- lines ----------------------------------------------------------------

  function newLine(className) {
    var line = document.createElement("div");
    line.className = "line " + className;
    pane.appendChild(line);
    lineCount += 1;
    if (lineCount > MAX_LINES) { trimOldest(); }
    return line;
  }

  function trimOldest() {
    if (!trimmedNotice) {
      trimmedNotice = document.createElement("div");
      trimmedNotice.className = "line trimmed";
      trimmedNotice.textContent = "Earlier lines are hidden here to keep the page fast; the raw logs above hold everything.";
      pane.insertBefore(trimmedNotice, pane.firstChild);
    }
    var oldest = trimmedNotice.nextSibling;
    for (var name in streams) { if (streams[name].line === oldest) { closeLine(streams[name]); } }
    if (oldest) { pane.removeChild(oldest); lineCount -= 1; }
  }

  function closeLine(state) {
    state.line = null;
    state.lineLength = 0;
    state.hidden = null;
  }

  function systemLine(text, extraClass) {
    for (var name in streams) { closeLine(streams[name]); }
    var line = newLine("system" + (extraClass ? " " + extraClass : ""));
    line.textContent = text;
  }

  function appendText(name, state, text) {
    if (!text) { return; }
    if (!state.line) { state.line = newLine(name); }
    if (state.carriage) {
      // A carriage return followed by text: the text overwrites the line.
      while (state.line.firstChild) { state.line.removeChild(state.line.firstChild); }
      state.carriage = false;
      state.lineLength = 0;
      state.hidden = null;
    }
    var room = LINE_CHARACTERS_SHOWN - state.lineLength;
    if (room > 0) { state.line.appendChild(styledSpan(state.sgr, text.slice(0, room))); }
    state.lineLength += text.length;
    if (state.lineLength > LINE_CHARACTERS_SHOWN) {
      if (!state.hidden) {
        state.hidden = document.createElement("span");
        state.hidden.className = "cut";
        state.line.appendChild(state.hidden);
      }
      state.hidden.textContent = " … " + (state.lineLength - LINE_CHARACTERS_SHOWN).toLocaleString("en") +
        " more characters on this line (see the raw log)";
    }
  }

  function appendControl(name, state, code) {
    if (!state.line) { state.line = newLine(name); }
    var span = document.createElement("span");
    span.className = "ctl";
    span.textContent = code === 127 ? "^?" : "^" + String.fromCharCode(64 + code);
    state.line.appendChild(span);
  }

  // Feed decoded text of one stream, keeping an unfinished escape for later.
  function feed(name, text) {
    var state = streamState(name);
    var buffer = state.pending + text;
    state.pending = "";
    var run = "";
    var i = 0;
    while (i < buffer.length) {
      var ch = buffer.charCodeAt(i);
      if (ch === 27) {
        appendText(name, state, run); run = "";
        if (i + 1 >= buffer.length) { state.pending = buffer.slice(i); return; }
        var kind = buffer.charAt(i + 1);
        if (kind === "[") {
          var end = i + 2;
          while (end < buffer.length && !(buffer.charCodeAt(end) >= 0x40 && buffer.charCodeAt(end) <= 0x7e)) { end += 1; }
          if (end >= buffer.length) {
            if (buffer.length - i < 256) { state.pending = buffer.slice(i); return; }
            i = buffer.length; break;
          }
          if (buffer.charAt(end) === "m") { applySgr(state.sgr, buffer.slice(i + 2, end)); }
          i = end + 1;
        } else if (kind === "]") {
          var bell = buffer.indexOf("\x07", i);
          var st = buffer.indexOf("\x1b\\", i + 2);
          var stop = bell < 0 ? st : (st < 0 ? bell : Math.min(bell, st));
          if (stop < 0) {
            if (buffer.length - i < 4096) { state.pending = buffer.slice(i); return; }
            i = buffer.length; break;
          }
          i = stop + (stop === bell ? 1 : 2);
        } else {
          i += 2;
        }
      } else if (ch === 10) {
        appendText(name, state, run); run = "";
        if (!state.line) { state.line = newLine(name); }
        closeLine(state);
        state.carriage = false;
        i += 1;
      } else if (ch === 13) {
        appendText(name, state, run); run = "";
        state.carriage = true;
        i += 1;
      } else if ((ch < 32 && ch !== 9) || ch === 127) {
        appendText(name, state, run); run = "";
        appendControl(name, state, ch);
        i += 1;
      } else {
        run += buffer.charAt(i);
        i += 1;
      }
    }
    appendText(name, state, run);
  }

  function decodeBase64(text) {
    var binary = atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
    return bytes;
  }

  // -- events ---------------------------------------------------------------

  function render(event) {
    if (event.kind === "output") {
      var name = event.stream === "stderr" ? "stderr" : "stdout";
      var state = streamState(name);
      feed(name, state.decoder.decode(decodeBase64(event.data), { stream: true }));
    } else if (event.kind === "status") {
      var pid = event.payload && event.payload.pid;
      systemLine("▶ started" + (pid ? " (pid " + pid + ")" : ""));
      var current = document.querySelector("#status-badge .badge");
      if (current && /badge-(queued|dispatched)/.test(current.className)) {
        replaceWith(document.getElementById("status-badge"), badge("running", "running"));
      }
      if (event.emitted_at) { document.getElementById("fact-started").textContent = formatTime(event.emitted_at); }
    } else if (event.kind === "exit") {
      for (var stream in streams) {
        var rest = streams[stream].decoder.decode();
        if (rest) { feed(stream, rest); }
      }
      var payload = event.payload || {};
      var code = payload.exit_code === null || payload.exit_code === undefined ? "—" : String(payload.exit_code);
      systemLine("■ " + (payload.status || "finished") + " · exit code " + code +
        (payload.reason ? " · " + payload.reason : ""));
    } else if (event.kind === "progress") {
      systemLine("… " + JSON.stringify(event.payload || {}));
    }
  }

  function renderGap(gap) {
    systemLine(gap.label + (gap.recorded ? " (never stored; the relay stopped waiting for it)" : " (still missing when the command ended)"), "gap");
  }

  function setState(text) { stateLine.textContent = text; }

  // The same form as the server renders: 2026-12-04 16:10:15 UTC.
  function formatTime(iso) {
    var date = new Date(iso);
    if (isNaN(date.getTime())) { return "—"; }
    return date.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function atBottom() { return pane.scrollHeight - pane.scrollTop - pane.clientHeight < 48; }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  async function fetchJson(url) {
    var response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!response.ok) { throw new Error("HTTP " + response.status); }
    return response.json();
  }

  async function follow() {
    var failures = 0;
    while (true) {
      var page;
      try {
        page = await fetchJson(eventsUrl + "?after=" + after + "&limit=" + PAGE_LIMIT + "&wait=" + WAIT_SECONDS);
        failures = 0;
      } catch (error) {
        failures += 1;
        setState("connection lost, retrying… (" + error.message + ")");
        await sleep(Math.min(1000 * failures, 10000));
        continue;
      }

      var stick = followBox.checked && atBottom();
      page.events.forEach(render);
      after = page.next_after;

      // A missing sequence the relay gave up on, or one still missing once
      // the command ended, is shown as such and passed.
      if (!page.events.length) {
        var blocking = page.gaps.filter(function (gap) { return gap.first === after + 1; })[0];
        if (blocking && (blocking.recorded || page.finished)) {
          renderGap(blocking);
          after = blocking.last;
          continue;
        }
      }
      if (stick) { pane.scrollTop = pane.scrollHeight; }

      var waiting = page.waiting_for ? " · waiting for " + page.waiting_for : "";
      if (page.highest_stored === 0) {
        setState("waiting for the runner to start it…");
      } else {
        setState((page.finished ? "ended" : "following") + " · sequence " + after + " of " +
          page.highest_stored + " stored" + waiting);
      }
      if (page.finished && after >= page.highest_stored) {
        setState("complete · " + page.highest_stored + " events");
        await showSummary();
        return;
      }
    }
  }

  // -- the end: status and verification ------------------------------------

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  function badge(text, kind) {
    var span = document.createElement("span");
    span.className = "badge badge-" + kind;
    span.textContent = text;
    return span;
  }

  function replaceWith(container, node) {
    while (container.firstChild) { container.removeChild(container.firstChild); }
    if (node) { container.appendChild(node); }
  }

  async function showSummary() {
    var detail = null;
    // The summary follows the relay's delivery of the exit event; wait for it.
    for (var attempt = 0; attempt < 60; attempt++) {
      try { detail = await fetchJson(commandUrl); } catch (error) { detail = null; }
      if (detail && detail.verification && detail.finished_at) { break; }
      await sleep(1000);
    }
    if (!detail) { return; }
    replaceWith(document.getElementById("status-badge"), badge(detail.status, detail.status));
    document.getElementById("fact-exit").textContent = detail.exit_code === null ? "—" : String(detail.exit_code);
    if (detail.started_at) { document.getElementById("fact-started").textContent = formatTime(detail.started_at); }
    document.getElementById("fact-delivery").textContent = (detail.delivery_state || "—") +
      (detail.delivered_through === null ? "" : " · through " + detail.delivered_through);
    if (detail.duration_seconds !== null) {
      document.getElementById("fact-duration").textContent = detail.duration_seconds.toFixed(1) + "s";
    }
    var cancelForm = document.getElementById("cancel-form");
    if (cancelForm) { cancelForm.parentNode.removeChild(cancelForm); }
    if (!detail.verification) { return; }

    var section = document.getElementById("verification");
    var body = document.querySelector("#verification-table tbody");
    replaceWith(body, null);
    ["stdout", "stderr"].filter(function (stream) { return detail.verification[stream]; }).forEach(function (stream) {
      var figures = detail.verification[stream];
      var row = document.createElement("tr");
      cell(row, stream);
      cell(row, figures.expected ? String(figures.expected.bytes) : "—", "num mono");
      cell(row, String(figures.stored.bytes), "num mono");
      cell(row, figures.expected ? figures.expected.sha256 : "—", "mono hash");
      cell(row, figures.stored.sha256, "mono hash");
      var verdict = cell(row, figures.matched === true ? "match" : figures.matched === false ? "differs" : "");
      verdict.className = figures.matched === true ? "ok" : figures.matched === false ? "bad" : "";
      body.appendChild(row);
    });
    var matched = detail.verification_matched;
    replaceWith(document.getElementById("verification-badge"),
      matched === true ? badge("verified", "verified") : matched === false ? badge("mismatch", "mismatch") : null);
    section.hidden = false;
  }

  // -- toolbar --------------------------------------------------------------

  function toggle(id, className, inverted) {
    var box = document.getElementById(id);
    function apply() { pane.classList.toggle(className, inverted ? !box.checked : box.checked); }
    box.addEventListener("change", apply);
    apply();
  }
  toggle("show-stdout", "hide-stdout", true);
  toggle("show-stderr", "hide-stderr", true);
  toggle("wrap-lines", "wrap", false);
  followBox.addEventListener("change", function () {
    if (followBox.checked) { pane.scrollTop = pane.scrollHeight; }
  });

  follow();
})();

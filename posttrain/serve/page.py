"""The page ``posttrain serve`` shows at ``/``: drop, pick or record a file; see the verdict, the
probability and the timeline (window scores over time, the threshold, the regions called fake)."""

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain: is this voice real?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:820px;margin:2em auto;padding:0 1em;color:#222}
 #drop{border:2px dashed #888;border-radius:8px;padding:2em;text-align:center;cursor:pointer}
 #drop.over{background:#eef}
 #verdict{font-size:2em;font-weight:bold;margin:.5em 0}
 .fake{color:#b00}.real{color:#070}.error{color:#b60}
 canvas{width:100%;height:182px;border:1px solid #ccc}
</style></head><body>
<h1>Is this voice real?</h1>
<p>Drop an audio file here (wav, flac, mp3, m4a, ogg, webm...), pick one, or record from the microphone.
The file is scored by the model this service runs and is deleted right after.</p>
<div id="drop">Drop a file or click to choose one<input id="file" type="file" accept="audio/*,video/*" hidden></div>
<p><button id="record">Record</button> <label>Token (if the service asks for one)
 <input id="token" type="password" autocomplete="off"></label></p>
<div id="status" role="status"></div>
<div id="verdict" data-state="idle"></div>
<div>P(real): <span id="probability">-</span> <span id="calibrated"></span></div>
<canvas id="timeline" width="800" height="182"></canvas>
<p id="legend">Timeline: each window's score (higher = more real) over time; dashed line = decision
 threshold; red = windows called fake.</p>
<script>
const $ = (id) => document.getElementById(id);
async function score(blob, name) {
  $("status").textContent = "scoring " + name + "...";
  $("verdict").textContent = ""; $("verdict").dataset.state = "busy";
  const headers = {"Content-Type": blob.type || "application/octet-stream", "X-Filename": name};
  if ($("token").value) headers["Authorization"] = "Bearer " + $("token").value;
  try {
    const response = await fetch("/v1/score", {method: "POST", headers, body: blob});
    const result = await response.json();
    if (!response.ok) { show_error(result.detail || response.statusText); return; }
    show(result);
  } catch (error) { show_error(String(error)); }
}
function show_error(message) {
  $("status").textContent = ""; $("verdict").className = "error";
  $("verdict").textContent = "error: " + message; $("verdict").dataset.state = "error";
}
function show(result) {
  $("status").textContent = result.file + ": " + result.seconds.toFixed(1) + " s, " + result.windows + " window(s)";
  $("verdict").className = result.decision;
  $("verdict").textContent = result.decision === "real" ? "real" : "fake";
  $("verdict").dataset.state = "done";
  $("probability").textContent = result.p_real === null ? "-" : result.p_real.toFixed(4);
  $("calibrated").textContent = result.probability_real_calibrated === null ? "(uncalibrated)"
    : "(calibrated: " + result.probability_real_calibrated.toFixed(4) + ")";
  draw(result.timeline);
}
function timeTicks(seconds) {
  // a round step giving at most 10 ticks: 0.5, 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10 min
  const steps = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800];
  const step = steps.find((s) => seconds / s <= 10) || 3600;
  const ticks = [];
  for (let t = 0; t <= seconds + 1e-9; t += step) ticks.push(Math.round(t * 1000) / 1000);
  return ticks;
}
function draw(timeline) {
  const canvas = $("timeline"), g = canvas.getContext("2d"), w = canvas.width, axis = 22, h = canvas.height - axis;
  g.clearRect(0, 0, w, canvas.height);
  const key = timeline.score_definition || "logit_diff", threshold = timeline["threshold_" + key];
  const scores = timeline.windows.map((x) => x[key]).concat([threshold]);
  const lo = Math.min(...scores) - 0.5, hi = Math.max(...scores) + 0.5;
  const x = (t) => t / Math.max(timeline.seconds, 1e-3) * w, y = (v) => h - (v - lo) / (hi - lo) * h;
  g.fillStyle = "rgba(200,0,0,0.15)";
  for (const [a, b] of timeline.fake_regions) g.fillRect(x(a), 0, x(b) - x(a), h);
  g.lineWidth = 3;
  for (const win of timeline.windows) {
    g.strokeStyle = win.decision === "fake" ? "#b00" : "#07a";
    g.beginPath(); g.moveTo(x(win.start_s), y(win[key])); g.lineTo(x(win.end_s), y(win[key])); g.stroke();
  }
  g.setLineDash([6, 4]); g.lineWidth = 1; g.strokeStyle = "#000";
  g.beginPath(); g.moveTo(0, y(threshold)); g.lineTo(w, y(threshold)); g.stroke();
  g.setLineDash([]);
  // the time axis: a tick and its label (seconds, or m:ss past a minute) at round steps
  const ticks = timeTicks(timeline.seconds), label = (t) => t < 60 ? t + " s"
    : Math.floor(t / 60) + ":" + String(Math.round(t % 60)).padStart(2, "0");
  g.strokeStyle = "#444"; g.fillStyle = "#444"; g.font = "11px sans-serif";
  g.beginPath(); g.moveTo(0, h + 0.5); g.lineTo(w, h + 0.5); g.stroke();
  ticks.forEach((t, i) => {
    const at = Math.min(x(t), w - 1);
    g.beginPath(); g.moveTo(at, h); g.lineTo(at, h + 5); g.stroke();
    g.textAlign = i === 0 ? "left" : (at > w - 20 ? "right" : "center");
    g.fillText(label(t), at, h + 17);
  });
  canvas.dataset.ticks = JSON.stringify(ticks.map(label));
}
const drop = $("drop");
drop.onclick = () => $("file").click();
$("file").onchange = () => { const f = $("file").files[0]; if (f) score(f, f.name); };
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over");
  const f = e.dataTransfer.files[0]; if (f) score(f, f.name); };
let recorder = null;
$("record").onclick = async () => {
  if (recorder) { recorder.stop(); return; }
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const parts = []; recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.onstop = () => { stream.getTracks().forEach((t) => t.stop());
    const blob = new Blob(parts, {type: recorder.mimeType}); recorder = null;
    $("record").textContent = "Record"; score(blob, "recording"); };
  recorder.start(); $("record").textContent = "Stop";
};
</script></body></html>
"""

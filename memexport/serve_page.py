"""The single page ``GET /`` serves: drop or pick photos, see them ranked by score (through ``POST /score``).

Self-contained (no external scripts, styles or fonts), so it works offline and behind any proxy.
Thumbnails are the browser's own copies of the files (object URLs): images never come back from
the server. A token field appears for servers started with ``--token``.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>memexport: memorability</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
#drop{border:2px dashed #888;border-radius:8px;padding:2rem;text-align:center;cursor:pointer}
#drop.over{background:#eef}
#results{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(12rem,1fr));gap:1rem}
.result{border:1px solid #ccc;border-radius:6px;padding:.5rem;text-align:center}
.result img{max-width:100%;max-height:10rem}
.score{font-size:1.4rem;font-weight:bold}.error{color:#b00}.name{word-break:break-all;font-size:.85rem}
#status{margin:1rem 0;min-height:1.2em}
</style></head><body>
<h1>How memorable are these photos?</h1>
<p>Drop photos here or pick them; they are ranked by predicted memorability (0 to 1, higher is more memorable).</p>
<label>Token (only if the server asks for one): <input id="token" type="password" autocomplete="off"></label>
<div id="drop">Drop photos here, or <label><u>pick them</u>
<input id="files" type="file" accept="image/*" multiple hidden></label></div>
<div id="status" role="status"></div>
<ol id="results"></ol>
<script>
const drop = document.getElementById("drop"), picker = document.getElementById("files");
const statusLine = document.getElementById("status"), list = document.getElementById("results");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); score(e.dataTransfer.files); });
picker.addEventListener("change", () => score(picker.files));

async function score(files) {
  files = Array.from(files);
  if (!files.length) return;
  const form = new FormData();
  files.forEach(f => form.append("file", f, f.name));
  const headers = {};
  const token = document.getElementById("token").value;
  if (token) headers["Authorization"] = "Bearer " + token;
  statusLine.textContent = "scoring " + files.length + " photo(s)...";
  let answer;
  try {
    const response = await fetch("score", {method: "POST", body: form, headers});
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
  } catch (error) { statusLine.textContent = "error: " + error.message; return; }
  show(files, answer);
}

function show(files, answer) {
  const rows = answer.map((row, i) => ({...row, url: URL.createObjectURL(files[i])}));
  rows.sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
  list.replaceChildren(...rows.map(row => {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.file = row.file;
    const img = document.createElement("img");
    img.src = row.url; img.alt = row.file;
    const value = document.createElement("div");
    if (row.score === undefined) { value.className = "error"; value.textContent = row.error; }
    else { value.className = "score"; value.textContent = row.score.toFixed(3); item.dataset.score = row.score; }
    const name = document.createElement("div");
    name.className = "name"; name.textContent = row.file;
    item.append(img, value, name);
    return item;
  }));
  const good = rows.filter(r => r.score !== undefined).length;
  statusLine.textContent = good + " of " + rows.length + " photo(s) scored, most memorable first.";
}
</script></body></html>
"""

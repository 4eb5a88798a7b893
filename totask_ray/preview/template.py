"""The page's one template (Jinja2, autoescaped): fixed-width cards so a thumbnail's place on the
screen is known, and a few lines of script that record each thumbnail's (and failure reason's)
rectangle on it
(`data-rect`: left, top, width, height in CSS px), which a test reads from the DOM."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>totask-ray preview: {{ job }}</title>
<style>
body{margin:0;font:13px/1.35 system-ui,sans-serif;background:#f4f4f4;color:#111}
header{height:64px;box-sizing:border-box;padding:8px 16px;background:#202124;color:#fff;overflow:hidden}
header h1{font-size:16px;margin:0 0 4px}
section{padding:8px 16px}
h2{font-size:15px;margin:8px 0}
.gallery{display:flex;flex-wrap:wrap;gap:16px;padding:16px}
.card{background:#fff;border:1px solid #ccc;padding:8px;width:{{ side }}px}
.card.pair{width:{{ side * 2 + 8 }}px}
.pics{display:flex;gap:8px;align-items:flex-start}
.pics figure{margin:0}
.pics figcaption{font-size:11px;color:#555}
img.thumb{display:block}
.nopic{width:{{ side }}px;height:120px;background:#ddd;display:flex;align-items:center;justify-content:center;color:#555}
.status{font-weight:600}
.status.failed{color:#b00020}
.reason{color:#b00020;white-space:pre-wrap;word-break:break-word}
.ocr{font-family:monospace;font-size:11px;white-space:pre-wrap}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.charts{display:flex;flex-wrap:wrap;gap:8px}
.note{color:#555}
tr.bound td{font-weight:600}
</style></head>
<body data-tasks="{{ views|length }}">
<header><h1>Preview of {{ job }}: {{ views|length }} of {{ total }} tasks ({{ how }})</h1>
<div>{{ message }}</div></header>
<div class="gallery">
{% for v in views %}
<div class="card{% if v.current_src %} pair{% endif %}" id="task-{{ v.task_id }}" data-task="{{ v.task_id }}" data-status="{{ v.status }}">
 <div class="pics">
 {% if v.src %}<figure><img class="thumb" src="{{ v.src }}" width="{{ v.width }}" height="{{ v.height }}" data-task="{{ v.task_id }}" data-scale="{{ '%.6f'|format(v.scale) }}" alt="task {{ v.task_id }}"><figcaption>would be written</figcaption></figure>
 {% else %}<div class="nopic">{{ v.picture_note }}</div>{% endif %}
 {% if v.current_src %}<figure><img class="current" src="{{ v.current_src }}" width="{{ v.current_width }}" height="{{ v.current_height }}" alt="task {{ v.task_id }} now"><figcaption>on the platform now</figcaption></figure>{% endif %}
 </div>
 <div>task {{ v.task_id }}{% if v.image_name %} &middot; {{ v.image_name }}{% endif %}: <span class="status {{ v.status }}">{{ v.status }}</span>{% if v.objects is not none %}, {{ v.objects }} object(s){% endif %}</div>
 {% if v.error %}<div class="reason" data-task="{{ v.task_id }}">{{ v.stage }}: {{ v.error }}</div>{% endif %}
 {% if v.texts %}<div class="ocr">{{ v.texts|join('\\n') }}</div>{% endif %}
</div>
{% endfor %}
</div>
<section><h2>Objects that would be written, per class</h2>
<table id="counts"><tr><th>class</th><th>objects</th><th>tasks</th></tr>
{% for c in counts %}<tr data-class="{{ c.name }}"><td><span class="swatch" style="background:rgb{{ c.colour }}"></span>{{ c.name }}</td><td class="count">{{ c.objects }}</td><td>{{ c.tasks }}</td></tr>
{% else %}<tr><td colspan="3" class="note">nothing would be written</td></tr>{% endfor %}
</table>
<p class="note">The project's classes{% if platform_name %} ({{ platform_name }}){% endif %}: {% for name in classes %}<span class="swatch" style="background:rgb{{ colours[loop.index0] }}"></span>{{ name }}{% if not loop.last %}, {% endif %}{% else %}none listed (objects keep the model's class ids){% endfor %}</p>
{% if controls %}<p class="note" id="controls">The labeling config's controls: {% for c in controls %}<code>{{ c.name }}</code> ({{ c.tag }} on <code>{{ c.to_name }}</code>): {{ c.labels|join(", ") or "any label" }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}</section>
<section><h2>Dropped, and why</h2>
{% if drops %}<table id="drops"><tr><th>reason</th><th>model label</th><th>objects</th></tr>
{% for reason, label, n in drops %}<tr><td>{{ reason }}</td><td>{{ label }}</td><td>{{ n }}</td></tr>{% endfor %}
</table>{% endif %}
<p class="note">{{ drops_note }}</p></section>
<section><h2>Outcomes the run would have</h2>
<table id="outcomes"><tr><th>task</th><th>status</th><th>stage</th><th>reason</th></tr>
{% for v in views %}<tr data-task="{{ v.task_id }}"><td>{{ v.task_id }}</td><td class="status {{ v.status }}">{{ v.status }}</td><td>{{ v.stage }}</td><td class="reason">{{ v.error }}</td></tr>{% endfor %}
</table></section>
<section><h2>Scores per class</h2><div class="charts">
{% for name, src in charts %}<img src="{{ src }}" alt="scores of {{ name }}">{% else %}<p class="note">no scores</p>{% endfor %}
</div></section>
<section><h2>Measured on the sample</h2>
<table id="stages"><tr><th>stage</th><th>time</th></tr>
{% for name, seconds in stages %}<tr><td>{{ name }}</td><td>{{ '%.1f'|format(seconds * 1000) }} ms</td></tr>{% endfor %}
</table>
<p class="note">What each stage took on this sample, on this cluster.</p></section>
{% if estimate %}<section id="estimate"><h2>{{ estimate.summary }}</h2>
<p>{{ estimate.start }} + {{ estimate.work }}.</p>
<table id="capacities"><tr><th>stage</th><th>tasks a second</th><th>from</th></tr>
{% for name, rate, how, bound in estimate.stages %}<tr{% if bound %} class="bound"{% endif %}><td>{{ name }}{% if bound %} (bounds the job){% endif %}</td><td>{{ rate }}</td><td>{{ how }}</td></tr>{% endfor %}
</table>
<p class="note">An estimate, not a measurement: projected with the cluster as it is now and the run's own pool
plan. Assumed, not measured: a write costs the platform what a task read does (no platform has a write that writes
nothing, to time); {% if estimate.machine %}a task costs {{ estimate.machine }}x the CPU of the sample's annotator pass (Ray
Data's own work), and each actor the pool starts beyond the sample's {{ estimate.actor_cpu }} CPU-s (both measured on a
2-core machine with the embedded platform); the machine's other load stays as it was while the preview waited, and
shares the cores with the run's processes. {% endif %}Other work on a shared multi-node cluster and
nodes still to come are not in it. After the run, compare: <code>totask-ray run JOB --projected-s {{ estimate.projected_s }}</code>
(<code>projected_s={{ estimate.projected_s }}</code> in Python) prints what it achieved against this.</p></section>{% endif %}
<section class="note">{{ footer }}</section>
<script>
for (const el of document.querySelectorAll('img.thumb, .card .reason')) {
  const r = el.getBoundingClientRect();
  el.dataset.rect = [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height].map(Math.round).join(',');
}
document.body.dataset.ready = '1';
</script>
</body></html>
"""

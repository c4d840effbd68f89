// The status page: the queue, each prompt's graph, live progress and output images.
// It reads /queue and /history, and watches every prompt's messages on /ws?monitor=1.
"use strict";

const prompts = new Map();  // prompt id -> {id, prompt, state, nodes: {id: state}, progress, images, error}
const NODE_W = 150, NODE_H = 26, GAP_X = 40, GAP_Y = 12;

function entry(id) {
  if (!prompts.has(id)) prompts.set(id, {id, prompt: null, state: "pending", nodes: {}, progress: null, images: [], error: ""});
  return prompts.get(id);
}

// Nodes and links of a prompt in either format: ComfyUI API ({id: {class_type, inputs}}) or nodegraph/1.
function graphOf(prompt) {
  const nodes = [], links = [];
  if (!prompt || typeof prompt !== "object") return {nodes, links};
  if (prompt.nodes && typeof prompt.nodes === "object") {
    for (const [id, spec] of Object.entries(prompt.nodes)) {
      nodes.push({id, type: spec.type});
      for (const target of Object.values(spec.inputs || {})) links.push([String(target).split(".")[0], id]);
    }
  } else {
    for (const [id, spec] of Object.entries(prompt)) {
      nodes.push({id, type: spec.class_type});
      for (const value of Object.values(spec.inputs || {})) {
        if (Array.isArray(value) && value.length === 2 && typeof value[1] === "number") links.push([String(value[0]), id]);
      }
    }
  }
  return {nodes, links};
}

// Columns by longest path from a source, rows in order within a column.
function layout(graph) {
  const depth = {}, sources = {};
  for (const n of graph.nodes) sources[n.id] = [];
  for (const [src, dst] of graph.links) if (dst in sources && src in sources) sources[dst].push(src);
  const visit = (id, seen) => {
    if (id in depth) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    depth[id] = sources[id].length ? 1 + Math.max(...sources[id].map(s => visit(s, seen))) : 0;
    return depth[id];
  };
  const rows = {}, place = {};
  for (const n of graph.nodes) {
    const col = visit(n.id, new Set());
    rows[col] = (rows[col] || 0) + 1;
    place[n.id] = {x: 10 + col * (NODE_W + GAP_X), y: 10 + (rows[col] - 1) * (NODE_H + GAP_Y)};
  }
  return place;
}

function svgEl(name, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawGraph(p) {
  const graph = graphOf(p.prompt), place = layout(graph);
  let width = 0, height = 0;
  for (const pos of Object.values(place)) { width = Math.max(width, pos.x + NODE_W + 10); height = Math.max(height, pos.y + NODE_H + 10); }
  const svg = svgEl("svg", {class: "graph", width, height});
  for (const [src, dst] of graph.links) {
    const a = place[src], b = place[dst];
    if (a && b) svg.appendChild(svgEl("line", {x1: a.x + NODE_W, y1: a.y + NODE_H / 2, x2: b.x, y2: b.y + NODE_H / 2}));
  }
  for (const n of graph.nodes) {
    const pos = place[n.id];
    const g = svgEl("g", {class: "node " + (p.nodes[n.id] || ""), "data-node": n.id});
    g.appendChild(svgEl("rect", {x: pos.x, y: pos.y, width: NODE_W, height: NODE_H}));
    g.appendChild(svgEl("text", {x: pos.x + 5, y: pos.y + 17}, `${n.id}: ${n.type}`.slice(0, 22)));
    svg.appendChild(g);
  }
  return svg;
}

function viewUrl(image) {
  const q = new URLSearchParams({filename: image.filename, subfolder: image.subfolder || "", type: image.type || "output"});
  return "/view?" + q.toString();
}

function render() {
  const box = document.getElementById("prompts");
  box.replaceChildren();
  for (const p of [...prompts.values()].reverse()) {
    const card = document.createElement("div");
    card.className = "card state-" + p.state;
    card.id = "prompt-" + p.id;
    const title = document.createElement("h3");
    title.textContent = `${p.id} — ${p.state}`;
    card.appendChild(title);
    if (p.progress) {
      const bar = document.createElement("progress");
      bar.max = p.progress.max; bar.value = p.progress.value;
      bar.title = `node ${p.progress.node}: ${p.progress.value}/${p.progress.max}`;
      card.appendChild(bar);
    }
    if (p.prompt) card.appendChild(drawGraph(p));
    if (p.error) {
      const err = document.createElement("div");
      err.className = "error"; err.textContent = p.error;
      card.appendChild(err);
    }
    const images = document.createElement("div");
    images.className = "images";
    for (const image of p.images) {
      const img = document.createElement("img");
      img.src = viewUrl(image); img.alt = image.filename;
      images.appendChild(img);
    }
    card.appendChild(images);
    box.appendChild(card);
  }
}

function renderQueue(queue) {
  const list = document.getElementById("queue");
  list.replaceChildren();
  const items = [...queue.queue_running.map(i => [i, "running"]), ...queue.queue_pending.map(i => [i, "pending"])];
  for (const [item, state] of items) {
    const li = document.createElement("li");
    li.textContent = `#${item[0]} ${item[1]} (${state})`;
    list.appendChild(li);
    const p = entry(item[1]);
    p.prompt = item[2]; p.state = state;
  }
  if (!items.length) list.innerHTML = '<li class="empty">empty</li>';
}

async function refresh() {
  const [queue, history] = await Promise.all([fetch("/queue").then(r => r.json()), fetch("/history?max_items=20").then(r => r.json())]);
  for (const [id, h] of Object.entries(history)) {
    const p = entry(id);
    p.prompt = h.prompt[2];
    p.state = h.status.status_str === "success" ? "success" : "error";
    p.images = Object.values(h.outputs).flatMap(o => o.images || []);
    for (const [event, data] of h.status.messages) {
      if (event === "execution_cached") for (const n of data.nodes) p.nodes[n] = p.nodes[n] || "cached";
      if (event === "execution_error") p.error = data.exception_message;
      if (event === "execution_interrupted") p.error = "interrupted";
    }
  }
  renderQueue(queue);
  render();
}

function onMessage(msg) {
  const data = msg.data || {};
  if (msg.type === "status") {
    document.getElementById("remaining").textContent = `(${data.status.exec_info.queue_remaining} remaining)`;
    refresh();
    return;
  }
  if (!data.prompt_id) return;
  const p = entry(data.prompt_id);
  switch (msg.type) {
    case "execution_start": p.state = "running"; break;
    case "execution_cached": for (const n of data.nodes) p.nodes[n] = "cached"; break;
    case "executing":
      for (const [n, s] of Object.entries(p.nodes)) if (s === "running") p.nodes[n] = "done";
      if (data.node !== null) p.nodes[data.node] = "running"; else refresh();
      p.progress = null;
      break;
    case "progress": p.progress = data; p.nodes[data.node] = "running"; break;
    case "executed": p.images.push(...(data.output.images || [])); break;
    case "execution_error": p.state = "error"; p.error = data.exception_message; if (data.node_id) p.nodes[data.node_id] = "failed"; break;
    case "execution_interrupted": p.state = "error"; p.error = "interrupted"; break;
    case "execution_success": p.state = "success"; break;
  }
  render();
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws?monitor=1`);
  const state = document.getElementById("connection");
  ws.onopen = () => { state.textContent = "live"; };
  ws.onmessage = event => { if (typeof event.data === "string") onMessage(JSON.parse(event.data)); };
  ws.onclose = () => { state.textContent = "disconnected; retrying"; setTimeout(connect, 2000); };
}

refresh();
connect();

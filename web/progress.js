// Train LoRA's progress on its node in ComfyUI's frontend: the `lora_trainer.progress` websocket
// event (nodes/progress.py) as one line above the node: step, loss (smoothed), validation loss, LR
// and ETA; before the first step (and during a validation or preview) what runs and how far along.
// Registering the event also keeps the frontend from warning "Unknown message type".
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawLineAbove } from "./line.js";

const TRAIN_LORA = "LoRATrainer_TrainLoRA";

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(r)}` : `${m}:${pad(r)}`;
}

function number(x, digits = 4) {
  return x === null || x === undefined ? "-" : Number(x).toPrecision(digits);
}

// What runs besides the steps: "validation at step 0: 6 of 15", "loading the model".
function phaseText(p) {
  return p.of !== null && p.of !== undefined ? `${p.phase}: ${p.done ?? 0} of ${p.of}` : `${p.phase}…`;
}

// One line of text for a payload (the fields nodes/progress.py documents).
export function statusLine(p) {
  if (p.event === "phase") {
    const parts = [phaseText(p)];
    if (p.step > 0) parts.push(`step ${p.step}/${p.total}`);
    if (p.eta !== null && p.eta !== undefined) parts.push(`ETA ${duration(p.eta)}`);
    return parts.join(" · ");
  }
  const parts = [`step ${p.step}/${p.total}`];
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${number(p.loss)} (avg ${number(p.smoothed_loss)})`);
  if (p.validation_loss !== null && p.validation_loss !== undefined) parts.push(`val ${number(p.validation_loss)}`);
  if (p.lr !== null && p.lr !== undefined) parts.push(`lr ${Number(p.lr).toExponential(1)}`);
  if (p.eta !== null && p.eta !== undefined) parts.push(p.step >= p.total ? "done" : `ETA ${duration(p.eta)}`);
  return parts.join(" · ");
}

function nodeOf(id) {
  const graph = app.graph;
  if (!graph || id === null || id === undefined) return null;
  return graph.getNodeById(Number(id)) ?? graph.getNodeById(id) ?? null;
}

api.addEventListener("lora_trainer.progress", ({ detail }) => {
  const node = nodeOf(detail?.node);
  if (!node || node.comfyClass !== TRAIN_LORA) return;
  node.loraTrainerProgress = detail;
  node.loraTrainerStatus = statusLine(detail);
  node.setDirtyCanvas?.(true, false);
});

app.registerExtension({
  name: "comfyui-lora-trainer.progress",
  nodeCreated(node) {
    if (node.comfyClass !== TRAIN_LORA) return;
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      draw?.apply(this, arguments);
      drawLineAbove(this, ctx, this.loraTrainerStatus);
    };
  },
});

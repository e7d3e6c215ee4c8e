// Encode Training Folder's summary on its node in ComfyUI's frontend: the node returns its buckets
// (`ui.text`, e.g. "12 images in 2 buckets (1152×896: 7, 896×1152: 5); 0 encoded, 12 from the cache"),
// drawn as one line above the node, as web/progress.js draws Train LoRA's progress.
import { app } from "../../scripts/app.js";
import { drawLineAbove } from "./line.js";

const ENCODE_FOLDER = "LoRATrainer_EncodeTrainingFolder";

app.registerExtension({
  name: "comfyui-lora-trainer.buckets",
  nodeCreated(node) {
    if (node.comfyClass !== ENCODE_FOLDER) return;
    const executed = node.onExecuted;
    node.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const text = message?.text;
      this.loraTrainerBuckets = Array.isArray(text) ? text.join(" ") : text ?? null;
      this.setDirtyCanvas?.(true, false);
    };
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      draw?.apply(this, arguments);
      drawLineAbove(this, ctx, this.loraTrainerBuckets);
    };
  },
});

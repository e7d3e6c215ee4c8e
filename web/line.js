// One line of text above a node, where the pack's extensions show a node's status (web/progress.js:
// Train LoRA's progress; web/buckets.js: Encode Training Folder's buckets). A module, not an extension.
export function drawLineAbove(node, ctx, text) {
  if (!text || node.flags?.collapsed) return;
  const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#9fd3ff";
  ctx.textAlign = "left";
  ctx.fillText(text, 0, -titleHeight - 24);  // above the frontend's source badge
  ctx.restore();
}

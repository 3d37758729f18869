// NPO Suite: hand-picking widget of "Collect Preference Pairs" (node NPOSuite_CollectPreferencePairs).
//
// After the node runs, it shows the batch's thumbnails (the previews the node returns). Click the
// preferred image (green), then the rejected one (red); the widget writes "chosen>rejected" (batch
// indices) into the node's `picks` widget. Queue again and the node appends that pair to the dataset.
// A third click starts a new pick. Nothing leaves the browser except the normal queued prompt.
import { app } from "../../scripts/app.js";

const NODE = "NPOSuite_CollectPreferencePairs";

function viewUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder || "", type: img.type || "temp" });
  return `/api/view?${q.toString()}`;
}

function setPicks(node, value) {
  const w = node.widgets?.find((x) => x.name === "picks");
  if (w) {
    w.value = value;
    w.callback?.(value);
  }
  node.setDirtyCanvas?.(true, true);
}

function render(node) {
  const st = node.__npoPairs;
  st.root.replaceChildren();
  st.images.forEach((img, i) => {
    const el = document.createElement("img");
    el.src = viewUrl(img);
    el.dataset.index = String(i);
    el.className = "npo-pairs-thumb";
    el.title = `image ${i}: click once for preferred, then the rejected one`;
    const role = st.chosen === i ? "chosen" : st.rejected === i ? "rejected" : "";
    el.dataset.role = role;
    el.style.cssText = "width:64px;height:64px;object-fit:contain;margin:2px;cursor:pointer;image-rendering:pixelated;"
      + `border:3px solid ${role === "chosen" ? "#2a2" : role === "rejected" ? "#d22" : "transparent"};`;
    el.addEventListener("click", (e) => {
      e.stopPropagation();
      if (st.chosen === null || st.rejected !== null) {
        st.chosen = i;
        st.rejected = null;
        setPicks(node, "");
      } else if (i !== st.chosen) {
        st.rejected = i;
        setPicks(node, `${st.chosen}>${st.rejected}`);
      }
      render(node);
    });
    st.root.appendChild(el);
  });
}

app.registerExtension({
  name: "npo_suite.collect_pairs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onCreated?.apply(this, arguments);
      const root = document.createElement("div");
      root.className = "npo-pairs-picker";
      root.style.cssText = "display:flex;flex-wrap:wrap;align-content:flex-start;min-height:72px;";
      this.__npoPairs = { root, images: [], chosen: null, rejected: null };
      const w = this.addDOMWidget("pair_picker", "npo_pair_picker", root, { serialize: false, hideOnZoom: false });
      w.serialize = false; // options.serialize keeps it out of the queued prompt; this keeps it out of widgets_values
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const st = this.__npoPairs;
      if (st && Array.isArray(message?.images)) {
        const same = st.images.length === message.images.length
          && st.images.every((im, i) => im.filename === message.images[i].filename);
        st.images = message.images;
        if (!same) {
          st.chosen = null;
          st.rejected = null;
        }
        render(this);
      }
      return r;
    };
  },
});

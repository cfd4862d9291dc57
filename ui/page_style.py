"""The page's own CSS (a few layout touches over Gradio's default theme)."""

PAGE_CSS = """
#page_style { display: none !important; }
.prompt-box { position: relative; gap: 0 !important; }
.prompt-box .token-counter {
  position: absolute !important; top: 8px; right: 10px; z-index: 5; width: auto !important; min-height: 0 !important;
}
.token-count {
  font-size: 0.8em; font-family: ui-monospace, monospace; padding: 1px 6px; border-radius: 6px;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
  color: var(--body-text-color-subdued);
}
.token-count.error { color: var(--error-text-color, #c00); }
.generate-column { justify-content: flex-start; gap: 8px; }
/* Generate, Stop and Skip only: the accordions below them keep their own height. */
.generate-column .job-button { min-height: 48px; }
.tool-button { align-self: center; max-width: 44px; font-size: 1.2em; padding: 4px !important; }
/* Previews of small jobs are small: show them as large as the gallery shows results. */
.live-preview img { width: 100% !important; height: 100% !important; object-fit: contain !important; }
.job-progress { display: flex; flex-direction: column; gap: 4px; padding: 2px 0; }
.job-progress-track {
  height: 8px; border-radius: 4px; overflow: hidden; background: var(--border-color-primary, #e5e7eb);
}
.job-progress-fill { height: 100%; background: var(--color-accent, #f97316); transition: width 0.15s linear; }
.job-progress.done .job-progress-fill { background: #16a34a; }
.job-progress.interrupted .job-progress-fill { background: #dc2626; }
.job-progress.idle .job-progress-track { opacity: 0.5; }
.job-progress-text { font-size: 0.85em; font-family: ui-monospace, monospace; color: var(--body-text-color-subdued); }
.model-note { font-size: 0.85em; color: var(--body-text-color-subdued); padding: 6px 0; }
/* gr.HTML takes no flex share of its own, so the note would be squeezed to a narrow column beside the top row. */
#model_note { flex: 3 1 0; min-width: min(240px, 100%); }
.prompt-reading { font-size: 0.85em; margin-bottom: 6px; }
.prompt-reading-label, .prompt-reading-steps { color: var(--body-text-color-subdued); font-size: 0.9em; }
.prompt-fragment.up { background: rgba(249, 115, 22, 0.18); border-radius: 3px; }
.prompt-fragment.down { background: rgba(59, 130, 246, 0.15); border-radius: 3px; }
.prompt-fragment sub { font-size: 0.75em; margin-left: 1px; color: var(--body-text-color-subdued); }
.prompt-break { font-weight: bold; margin: 0 4px; color: var(--color-accent, #f97316); }
.prompt-chunks { color: var(--body-text-color-subdued); font-family: ui-monospace, monospace; margin-left: 8px; }
table.png-params { border-collapse: collapse; width: 100%; font-size: 0.9em; }
table.png-params th { text-align: left; white-space: nowrap; width: 1%; padding: 3px 16px 3px 0; vertical-align: top; }
table.png-params td { padding: 3px 0; word-break: break-word; }
table.png-params tr + tr { border-top: 1px solid var(--border-color-primary); }
"""

# Hover texts gradio's buttons take no argument for, set on each as it appears.
PAGE_JS = """
(() => {
  const titles = {
    "_paste": "Read generation parameters from an A1111 infotext pasted into the prompt, "
      + "or from the last generation when the prompt is empty (A1111's ↙)",
  };
  const label = () => {
    for (const [suffix, title] of Object.entries(titles)) {
      document.querySelectorAll(`button[id$="${suffix}"]:not([title])`).forEach((button) => { button.title = title; });
    }
  };
  new MutationObserver(label).observe(document.documentElement, { childList: true, subtree: true });
})();
"""

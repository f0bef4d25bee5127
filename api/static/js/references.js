// The form's reference images: dropped or chosen, each uploaded at once through POST /v1/files.

import { byId, clear, h, say } from "./dom.js";

const MAX_REFERENCES = 4;

export function setupReferences(api, { fileInput, formMessage, onChange = () => {} }) {
  const dropzone = byId("dropzone");
  const refList = byId("reference-list");
  /** @type {{name: string, status: string, url?: string, width?: number, height?: number, preview?: string, upload?: Promise<void>, message?: string}[]} */
  let references = [];

  function renderReferences() {
    clear(refList);
    references.forEach((ref, index) => {
      const remove = h("button", { type: "button", class: "small", "aria-label": `Remove ${ref.name}` }, "×");
      remove.addEventListener("click", () => {
        if (ref.preview) URL.revokeObjectURL(ref.preview);
        references.splice(index, 1);
        renderReferences();
      });
      let thumb = null;
      if (ref.preview) {
        thumb = h("img", { src: ref.preview, alt: "" });
        thumb.addEventListener("error", () => thumb.remove()); // a policy without blob: images: the name is enough
      }
      const state = ref.status === "ready" ? "" : ref.status === "error" ? `failed: ${ref.message}` : "uploading…";
      refList.append(
        h("li", { "data-status": ref.status }, thumb, h("span", { text: ref.name }), state && h("em", { text: state }), remove),
      );
    });
    onChange();
  }

  function addFiles(files) {
    say(formMessage, "");
    for (const file of files) {
      if (references.length >= MAX_REFERENCES) {
        say(formMessage, `At most ${MAX_REFERENCES} reference images.`, "error");
        break;
      }
      if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
        say(formMessage, `${file.name}: not a PNG, JPEG or WebP image.`, "error");
        continue;
      }
      const ref = { name: file.name, status: "uploading", preview: URL.createObjectURL(file) };
      const body = new FormData();
      body.append("file", file, file.name);
      ref.upload = api
        .post("/v1/files", { form: body })
        .then((uploaded) => Object.assign(ref, { status: "ready", url: uploaded.url, width: uploaded.width, height: uploaded.height }))
        .catch((error) => Object.assign(ref, { status: "error", message: error.message }))
        .finally(renderReferences);
      references.push(ref);
    }
    renderReferences();
  }

  fileInput.addEventListener("change", () => {
    addFiles([...fileInput.files]);
    fileInput.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      dropzone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    dropzone.addEventListener(name, () => dropzone.classList.remove("over"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles([...(event.dataTransfer?.files || [])]);
  });

  return {
    get list() {
      return references;
    },
    /** Uploaded references by URL (a prediction's, from History). */
    replace(urls) {
      references = urls.map((url, i) => ({ name: `reference ${i + 1}`, status: "ready", url }));
      renderReferences();
    },
  };
}

// Validates the HTTPRoute documents given as JSON on stdin (an array) with the Gateway API's
// published schemas, as the npm package @kubernetes-models/gateway-api carries them (generated
// from the project's CRDs). Prints one line per document; exits 1 on any invalid one.
// Called by scripts/check-k8s.py with NODE_PATH pointing at that package's install.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
// The package is ESM-only; import its file directly (bare specifiers resolve from this
// script's folder, not NODE_PATH).
const file = `${process.env.NODE_PATH}/@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute.js`;
const { HTTPRoute } = await import(pathToFileURL(file).href);
let bad = 0;
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  try {
    new HTTPRoute(doc).validate();
    console.log(`ok HTTPRoute/${doc.metadata?.name}`);
  } catch (e) {
    bad += 1;
    console.log(`INVALID HTTPRoute/${doc.metadata?.name}: ${e.message}`);
  }
}
process.exit(bad ? 1 : 0);

// Bundle the viewer's two pages into www/assets/ with esbuild: no framework, no CDN at run
// time (model-viewer and three.js are inside product.js). `npm run build` (after `npm ci`).
import { build } from "esbuild";
import { mkdirSync, rmSync, statSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outdir = join(here, "www", "assets");
rmSync(outdir, { recursive: true, force: true });
mkdirSync(outdir, { recursive: true });

await build({
  entryPoints: { gallery: join(here, "src", "gallery.js"), product: join(here, "src", "product.js") },
  outdir,
  bundle: true,
  format: "esm",
  minify: true,
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  legalComments: "linked", // licences of three.js, lit and model-viewer go to *.LEGAL.txt
  logLevel: "warning",
});

for (const name of readdirSync(outdir)) {
  console.log(`viewer/www/assets/${name}  ${(statSync(join(outdir, name)).size / 1024).toFixed(0)} KiB`);
}

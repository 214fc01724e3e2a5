// Before `npm pack`, copies the public protos (and the Google ones they import) into the
// package, which then reads its own copy; after, removes it so a checkout reads ../../protos.
import { cpSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const into = fileURLToPath(new URL('../protos', import.meta.url));
rmSync(into, { recursive: true, force: true });
if (process.argv[2] !== '--remove') {
  for (const dir of ['weir/v1', 'google']) {
    cpSync(fileURLToPath(new URL(`../../../protos/${dir}`, import.meta.url)), `${into}/${dir}`,
      { recursive: true });
  }
}

#!/usr/bin/env bash
# The browser assets the service serves at /web/vendor (kappamask.web): fetched from npm at
# these exact versions and copied unchanged with their licences, so that the map page, the
# HTML pages and Swagger UI need no CDN (air-gapped and DIAS deployments have none).
#   bash tools/vendor_web.sh        # then commit service/kappamask/api/web/vendor
set -euo pipefail
# geotiff: the version OpenLayers depends on; its full build reads COGs through the global
# GeoTIFF that geotiff.js defines
OL=10.11.0 GEOTIFF=3.1.0-beta.0 PROJ4=2.22.0 BOOTSTRAP=5.3.8 SWAGGER=5.35.0
out=$(cd "$(dirname "$0")/.." && pwd)/service/kappamask/api/web/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "ol@$OL" "geotiff@$GEOTIFF" "proj4@$PROJ4" "bootstrap@$BOOTSTRAP" "swagger-ui-dist@$SWAGGER" >/dev/null
for t in *.tgz; do mkdir "${t%.tgz}" && tar xzf "$t" -C "${t%.tgz}"; done
rm -rf "$out" && mkdir -p "$out"/{ol,geotiff,proj4,bootstrap,swagger-ui}
cp "ol-$OL/package/dist/ol.js" "ol-$OL/package/ol.css" "ol-$OL/package/LICENSE.md" "$out/ol/"
cp "geotiff-$GEOTIFF/package/dist-browser/geotiff.js" "geotiff-$GEOTIFF/package/LICENSE" \
  "$out/geotiff/"
cp "proj4-$PROJ4/package/dist/proj4.js" "proj4-$PROJ4/package/LICENSE.md" "$out/proj4/"
cp "bootstrap-$BOOTSTRAP/package/dist/css/bootstrap.min.css" "bootstrap-$BOOTSTRAP/package/LICENSE" \
  "$out/bootstrap/"
s="swagger-ui-dist-$SWAGGER/package"
cp "$s/swagger-ui-bundle.js" "$s/swagger-ui.css" "$s/LICENSE" "$s/NOTICE" "$out/swagger-ui/"
cat > "$out/VERSIONS" <<VERSIONS
ol $OL (BSD-2-Clause)
geotiff $GEOTIFF (MIT)
proj4 $PROJ4 (MIT)
bootstrap $BOOTSTRAP (MIT)
swagger-ui-dist $SWAGGER (Apache-2.0)
VERSIONS
echo "vendored into $out"

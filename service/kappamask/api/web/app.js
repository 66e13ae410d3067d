'use strict';
// The service's map page: submit a product, follow its job, and draw the mask COG (read by
// OpenLayers with range requests) over the mask-over-true-colour preview, with the class
// colours and names the service itself declares (/web/classes.json).

const $ = (id) => document.getElementById(id);
const RESULTS = 'http://www.opengis.net/def/rel/ogc/1.0/results';
const FINISHED = ['successful', 'failed', 'dismissed'];
const ASSET_TITLES = {
  mask: 'mask (COG)', confidence: 'confidence (COG)', probability: 'cloud probability (COG)',
  valid: 'usable pixels (COG)', preview: 'preview (PNG)', item: 'STAC item',
};

const osm = new ol.layer.Tile({ source: new ol.source.OSM(), visible: false });
const map = new ol.Map({ target: 'map', layers: [osm],
                         view: new ol.View({ center: [0, 0], zoom: 2 }) });
const page = { map, result: null, mask: null, preview: null, classes: [] };
window.kappamask = page;  // what the browser test reads

// The service names itself by its public URL; its own files are fetched from the origin
// this page was opened on (the same service), so range requests stay same-origin.
function local(href) {
  const url = new URL(href, location.href);
  const own = ['/outputs/', '/jobs/', '/processes/'].some((p) => url.pathname.startsWith(p));
  return own ? url.pathname + url.search : url.href;
}

function link(document_, rel) {
  const found = (document_.links || []).find((l) => l.rel === rel && l.type === 'application/json');
  return found && found.href;
}

async function getJSON(url, init) {
  const response = await fetch(url, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${response.status}: ${body.description || response.statusText}`);
  }
  return body;
}

function showStatus(status, message, progress) {
  $('job-status').textContent = `${status}${message ? ': ' + message : ''}`;
  $('job-status').className = status === 'failed' ? 'mt-1 text-danger' : 'mt-1';
  if (progress !== undefined) $('job-progress').style.width = `${progress}%`;
  document.body.dataset.job = status;
}

async function submit(event) {
  event.preventDefault();
  const inputs = {
    product: $('product').value.trim(),
    resolution: Number($('resolution').value),
    overwrite: $('overwrite').checked,
    shadow_check: $('shadow_check').checked,
  };
  if ($('level').value) inputs.level = $('level').value;
  if ($('output').value.trim()) inputs.output = $('output').value.trim();
  $('go').disabled = true;
  $('job').hidden = false;
  $('results').hidden = true;
  try {
    const status = await getJSON('/processes/kappamask/execution', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Prefer: 'respond-async' },
      body: JSON.stringify({ inputs, response: 'raw' }),
    });
    history.replaceState(null, '', `?job=${encodeURIComponent(status.jobID)}`);
    await follow(status);
  } catch (err) {
    showStatus('failed', err.message);
  } finally {
    $('go').disabled = false;
  }
}

async function follow(status) {
  $('job').hidden = false;
  const self = link(status, 'self');
  $('job-link').textContent = status.jobID;
  $('job-link').href = local(self).replace('f=json', 'f=html');
  let job = status;
  while (!FINISHED.includes(job.status)) {
    showStatus(job.status, job.message, job.progress);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    job = await getJSON(local(self));
  }
  showStatus(job.status, job.message, job.progress);
  if (job.status === 'successful') await show(await getJSON(local(link(job, RESULTS))));
}

function listLinks(result) {
  const list = $('links');
  list.replaceChildren();
  for (const [key, title] of Object.entries(ASSET_TITLES)) {
    if (!result[key]) continue;
    const item = document.createElement('li');
    const anchor = document.createElement('a');
    anchor.href = local(result[key]);
    anchor.textContent = title;
    anchor.dataset.asset = key;
    item.append(anchor);
    list.append(item);
  }
  $('results').hidden = false;
}

// UTM zones of WGS 84 (every Sentinel-2 tile): proj4 learns them from their EPSG code.
function registerProjection(code) {
  const utm = /^EPSG:32([67])(\d\d)$/.exec(code);
  if (utm && !proj4.defs(code)) {
    const south = utm[1] === '7' ? ' +south' : '';
    proj4.defs(code, `+proj=utm +zone=${Number(utm[2])}${south} +datum=WGS84 +units=m +no_defs`);
    ol.proj.proj4.register(proj4);
  }
}

async function show(result) {
  page.result = result;
  const cover = result.cloud_cover === undefined ? '' : `, cloud cover ${result.cloud_cover.toFixed(1)} %`;
  $('job-product').textContent = `${result.product_id} (${result.level}${cover})`;
  listLinks(result);
  const item = await getJSON(local(result.item));
  const props = item.properties || {};
  registerProjection(props['proj:code'] || (props['proj:epsg'] ? `EPSG:${props['proj:epsg']}` : ''));
  // clear is left transparent: the true colour shows through
  const palette = [];
  for (const c of page.classes) palette[c.code] = c.name === 'clear' ? [0, 0, 0, 0] : c.color;
  const source = new ol.source.GeoTIFF({
    sources: [{ url: local(result.mask) }], normalize: false, interpolate: false,
  });
  const viewOptions = await source.getView();
  for (const layer of [page.mask, page.preview]) if (layer) map.removeLayer(layer);
  page.preview = new ol.layer.Image({
    source: new ol.source.ImageStatic({
      url: local(result.preview), imageExtent: viewOptions.extent,
      projection: viewOptions.projection,
    }),
  });
  page.mask = new ol.layer.WebGLTile({
    source, opacity: Number($('opacity').value),
    style: { color: ['palette', ['band', 1], Array.from(palette, (c) => c || [0, 0, 0, 0])] },
  });
  map.addLayer(page.preview);
  map.addLayer(page.mask);
  map.setView(new ol.View(viewOptions));
  map.getView().fit(viewOptions.extent);
  map.once('rendercomplete', () => { document.body.dataset.map = 'drawn'; });
}

// The map as drawn, all layers composed (what a person sees), as RGBA bytes.
page.snapshot = () => new Promise((resolve) => {
  map.once('rendercomplete', () => {
    const [width, height] = map.getSize();
    const out = document.createElement('canvas');
    out.width = width;
    out.height = height;
    const context = out.getContext('2d');
    for (const canvas of map.getViewport().querySelectorAll('.ol-layer canvas, canvas.ol-layer')) {
      if (!canvas.width) continue;
      const opacity = canvas.parentNode.style.opacity || canvas.style.opacity;
      context.globalAlpha = opacity === '' ? 1 : Number(opacity);
      context.drawImage(canvas, 0, 0, width, height);
    }
    resolve(Array.from(context.getImageData(0, 0, width, height).data));
  });
  map.render();
});

// The share of the map's pixels the mask layer changes: drawn with it, then without.
page.maskShare = async () => {
  const withMask = await page.snapshot();
  page.mask.setVisible(false);
  const without = await page.snapshot();
  page.mask.setVisible(true);
  await page.snapshot();
  let changed = 0;
  for (let i = 0; i < withMask.length; i += 4) {
    if (Math.abs(withMask[i] - without[i]) + Math.abs(withMask[i + 1] - without[i + 1])
        + Math.abs(withMask[i + 2] - without[i + 2]) > 24) changed += 1;
  }
  return changed / (withMask.length / 4);
};

async function start() {
  page.classes = await getJSON('/web/classes.json');
  const legend = $('legend');
  for (const c of page.classes) {
    const entry = document.createElement('span');
    entry.className = 'small';
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgba(${c.color.join(',')})`;
    entry.append(swatch, c.name === 'clear' ? `${c.name} (transparent on the map)` : c.name);
    legend.append(entry);
  }
  $('submit').addEventListener('submit', submit);
  $('opacity').addEventListener('input', (e) => page.mask && page.mask.setOpacity(Number(e.target.value)));
  $('basemap').addEventListener('change', (e) => osm.setVisible(e.target.checked));
  const job = new URLSearchParams(location.search).get('job');
  if (job) {
    try {
      await follow(await getJSON(`/jobs/${encodeURIComponent(job)}?f=json`));
    } catch (err) {
      $('job').hidden = false;
      showStatus('failed', err.message);
    }
  }
}

start();

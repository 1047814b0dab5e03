// wsicodec serve: the slide page. CFG (set by the page): dzi, source, diff, mpp, sourceMpp, osd.
(function () {
  "use strict";
  function makeViewer(id, dzi) {
    return OpenSeadragon({
      id: id, tileSources: dzi, prefixUrl: CFG.osd, showNavigator: true, navigatorPosition: "TOP_RIGHT",
      animationTime: 0.4, zoomPerScroll: 1.6, maxZoomPixelRatio: 2, crossOriginPolicy: false,
      gestureSettingsMouse: {clickToZoom: false}
    });
  }

  // Scale bar: the item's screen pixels per image pixel, times µm per image pixel, rounded to 1/2/5 x 10^k.
  function scaleBar(viewer, barId, mpp) {
    var bar = document.getElementById(barId);
    if (!bar) return;
    if (!mpp) { bar.querySelector("span").textContent = "no µm/px recorded"; return; }
    function update() {
      var item = viewer.world.getItemAt(0);
      if (!item) return;
      var screenPerPx = item.viewportToImageZoom(viewer.viewport.getZoom(true));
      var umPerScreenPx = mpp / screenPerPx;
      var target = 120 * umPerScreenPx, p = Math.pow(10, Math.floor(Math.log10(target)));
      var nice = [5, 2, 1].map(function (m) { return m * p; }).find(function (v) { return v <= target; }) || p;
      bar.querySelector("div").style.width = Math.round(nice / umPerScreenPx) + "px";
      bar.querySelector("span").textContent = nice >= 1000 ? (nice / 1000) + " mm" : (+nice.toPrecision(3)) + " µm";
    }
    viewer.addHandler("open", update);
    viewer.addHandler("animation", update);
    viewer.addHandler("resize", update);
  }

  var restored = makeViewer("restored", CFG.dzi);
  scaleBar(restored, "bar-restored", CFG.mpp);
  window.wsicodecViewers = {restored: restored};

  if (CFG.diff) {
    restored.addHandler("open", function () {
      restored.addTiledImage({tileSource: CFG.diff, opacity: 0, index: 1, success: function (ev) {
        var diff = ev.item, box = document.getElementById("diff");
        box.disabled = false;
        box.addEventListener("change", function () { diff.setOpacity(box.checked ? 1 : 0); });
      }});
    });
    document.getElementById("diff").disabled = true;
  }

  if (CFG.source) {
    // Both images cover the same area; OpenSeadragon's viewport coordinates are normalised to the image
    // width, so copying centre and zoom keeps them aligned whatever their pixel sizes.
    var source = makeViewer("source", CFG.source);
    scaleBar(source, "bar-source", CFG.sourceMpp);
    window.wsicodecViewers.source = source;
    var leading = null;
    function follow(from, to) {
      from.addHandler("viewport-change", function () {
        if (leading && leading !== from) return;
        leading = from;
        to.viewport.zoomTo(from.viewport.getZoom(), null, true);
        to.viewport.panTo(from.viewport.getCenter(), true);
        leading = null;
      });
    }
    follow(restored, source);
    follow(source, restored);
  }
})();

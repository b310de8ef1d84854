-- befund auto-forward for Orthanc: install with `"LuaScripts": ["orthanc_autoforward.lua"]`
-- and register befund as a modality: `"DicomModalities": {"befund": ["BEFUND", "host", 11112]}`.
--
-- When a study becomes stable (no new instance for `StableAge` seconds), its image series are
-- sent to befund, one asynchronous store job per series. Only the modalities below are sent:
-- befund's own results (SR, SEG) and other derived objects (KO, PR) never go back, so results
-- cannot loop between the PACS and the node.
--
-- The store goes through the REST API (`RestApiPost('/modalities/befund/store', ...)`) because
-- Lua `SendToModality` fails on Debian's Orthanc 1.10.1 ("Unable to read attachment dicom").

local BEFUND_MODALITY = 'befund'                 -- the name in DicomModalities
local FORWARDED = { CT = true, SM = true }       -- image series befund has models for
local NEVER = { SR = true, SEG = true, KO = true, PR = true }

local function forward_series(seriesId, modality)
   local job = RestApiPost('/modalities/' .. BEFUND_MODALITY .. '/store',
                           DumpJson({ Resources = { seriesId }, Synchronous = false }, true))
   local answer = ParseJson(job)
   print('befund: forwarding series ' .. seriesId .. ' (' .. modality .. '), Orthanc job ' ..
         tostring(answer['ID']))
end

function OnStableStudy(studyId, tags, metadata)
   local study = ParseJson(RestApiGet('/studies/' .. studyId))
   for _, seriesId in ipairs(study['Series']) do
      local series = ParseJson(RestApiGet('/series/' .. seriesId))
      local modality = string.upper(series['MainDicomTags']['Modality'] or '')
      if FORWARDED[modality] and not NEVER[modality] then
         local ok, err = pcall(forward_series, seriesId, modality)
         if not ok then
            print('befund: could not queue series ' .. seriesId .. ': ' .. tostring(err))
         end
      else
         print('befund: not forwarding series ' .. seriesId .. ' (modality ' .. modality .. ')')
      end
   end
end

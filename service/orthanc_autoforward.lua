-- befund auto-forward for Orthanc: each image series goes to befund once.
--
-- Install in an existing Orthanc (its configuration file):
--   "LuaScripts": ["/path/to/orthanc_autoforward.lua"],
--   "DicomModalities": { "befund": ["BEFUND", "befund-host", 11112] }
-- (befund's allow-list must take Orthanc's AE title and address: `allow` in befund.yaml.)
--
-- Why per series, not per study: an OnStableStudy script re-sent a study's images when
-- befund's SR arrived, because a new instance restarts the *study's* stable timer; PACS-to-AI
-- traffic doubled. A series' timer is restarted only by instances of that series, so the SR
-- (a series of its own) never re-triggers the CT. On top of that:
--   * only the modalities befund has models for are forwarded (FORWARDED);
--   * a series that befund itself sent (its SR, SEG, or anything with befund's AE title as
--     the sender) is never forwarded back;
--   * a series that becomes stable again because late instances arrived forwards only those
--     instances (received after the last forward), not the whole series once more. What was
--     forwarded is remembered while Orthanc runs; Orthanc fires no stable events for old series
--     after a restart, so nothing is forwarded twice then either.
--
-- The store goes through the REST API (`RestApiPost('/modalities/befund/store', ...)`) because
-- Lua `SendToModality` fails on Debian's Orthanc 1.10.1 ("Unable to read attachment dicom").

local BEFUND_MODALITY = 'befund'                 -- the name in DicomModalities
local FORWARDED = { CT = true, SM = true }       -- image series befund has models for
local forwarded_at = {}                          -- series id -> ReceptionDate of its last forward

local function befund_aet()
   local ok, answer = pcall(RestApiGet, '/modalities?expand')
   if ok and answer then
      local modality = ParseJson(answer)[BEFUND_MODALITY]
      if modality and modality['AET'] then
         return modality['AET']
      end
   end
   return 'BEFUND'
end

local function metadata(instanceId, name)
   local ok, value = pcall(RestApiGet, '/instances/' .. instanceId .. '/metadata/' .. name)
   if ok then
      return value
   end
   return nil
end

local function store(resources, what)
   local job = RestApiPost('/modalities/' .. BEFUND_MODALITY .. '/store',
                           DumpJson({ Resources = resources, Synchronous = false }, true))
   print('befund: forwarding ' .. what .. ', Orthanc job ' .. tostring(ParseJson(job)['ID']))
end

function OnStableSeries(seriesId, tags, metadata_)
   local modality = string.upper(tags['Modality'] or '')
   if not FORWARDED[modality] then
      print('befund: not forwarding series ' .. seriesId .. ' (modality ' .. modality .. ')')
      return
   end
   local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
   if #instances == 0 then
      return
   end
   if metadata(instances[1]['ID'], 'RemoteAET') == befund_aet() then
      print('befund: not forwarding series ' .. seriesId .. ': befund sent it')
      return
   end
   local newest = ''
   local fresh = {}
   for _, instance in ipairs(instances) do
      local received = metadata(instance['ID'], 'ReceptionDate') or ''
      if received > newest then
         newest = received
      end
      if forwarded_at[seriesId] == nil or received > forwarded_at[seriesId] then
         table.insert(fresh, instance['ID'])
      end
   end
   if #fresh == 0 then
      return
   end
   local ok, err
   if forwarded_at[seriesId] == nil then
      ok, err = pcall(store, { seriesId }, 'series ' .. seriesId .. ' (' .. modality .. ')')
   else
      ok, err = pcall(store, fresh, #fresh .. ' late instance(s) of series ' .. seriesId)
   end
   if ok then
      forwarded_at[seriesId] = newest
   else
      print('befund: could not queue series ' .. seriesId .. ': ' .. tostring(err))
   end
end
